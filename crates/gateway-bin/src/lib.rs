//! The gateway binary and the library that composes the layers into a running server.
