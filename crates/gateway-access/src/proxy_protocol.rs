//! PROXY protocol v1 (text) and v2 (binary): the load balancer's header at the start of each
//! connection, naming the client it accepted the connection from.
//!
//! Only the header's length is worked out here, so that not one byte of what follows (the TLS
//! handshake or the first request) is consumed; the header itself is parsed by `ppp`.

use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};

/// v1 headers are at most 107 bytes, CRLF included (the spec's limit).
const V1_MAX: usize = 107;
/// The shortest v1 header, `PROXY UNKNOWN\r\n`: this much can always be read at once.
const V1_MIN: usize = 15;
/// v2's fixed part: signature (12), version/command, family/protocol, length (2).
const V2_FIXED: usize = 16;
/// v2 address blocks are small; TLVs could make a header longer, but nothing we read needs
/// more than this, and a bound keeps a hostile peer from making us buffer 64 KiB.
const V2_MAX_PAYLOAD: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("no PROXY header within {0:?}")]
    Timeout(Duration),
    #[error("reading the PROXY header: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a PROXY protocol header")]
    Missing,
    #[error("invalid PROXY header: {0}")]
    Invalid(String),
}

/// Reads the header at the start of `io` within `timeout`. Returns the client's address, or
/// `None` when the header carries none (v1 `UNKNOWN`, v2 `LOCAL` health checks, UNIX
/// sockets): the connection's peer then stands for the client.
pub async fn read_header<IO>(
    io: &mut IO,
    timeout: Duration,
) -> Result<Option<SocketAddr>, ProxyHeaderError>
where
    IO: AsyncRead + Unpin,
{
    tokio::time::timeout(timeout, read(io))
        .await
        .map_err(|_| ProxyHeaderError::Timeout(timeout))?
}

async fn read<IO>(io: &mut IO) -> Result<Option<SocketAddr>, ProxyHeaderError>
where
    IO: AsyncRead + Unpin,
{
    let mut buffer = vec![0u8; V1_MIN];
    io.read_exact(&mut buffer).await?;
    if buffer.starts_with(ppp::v2::PROTOCOL_PREFIX) {
        buffer.resize(V2_FIXED, 0);
        io.read_exact(&mut buffer[V1_MIN..]).await?;
        let payload = usize::from(u16::from_be_bytes([buffer[14], buffer[15]]));
        if payload > V2_MAX_PAYLOAD {
            return Err(ProxyHeaderError::Invalid(format!(
                "v2 header of {payload} bytes"
            )));
        }
        buffer.resize(V2_FIXED + payload, 0);
        io.read_exact(&mut buffer[V2_FIXED..]).await?;
        return v2_source(&buffer);
    }
    if !buffer.starts_with(b"PROXY ") {
        return Err(ProxyHeaderError::Missing);
    }
    // Byte by byte so nothing after the CRLF is taken; at most 92 reads, once per connection.
    while !buffer.ends_with(b"\r\n") {
        if buffer.len() >= V1_MAX {
            return Err(ProxyHeaderError::Invalid(
                "v1 header longer than 107 bytes".into(),
            ));
        }
        let mut byte = [0u8; 1];
        io.read_exact(&mut byte).await?;
        buffer.push(byte[0]);
    }
    v1_source(&buffer)
}

fn v1_source(bytes: &[u8]) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let header = ppp::v1::Header::try_from(bytes)
        .map_err(|err| ProxyHeaderError::Invalid(err.to_string()))?;
    Ok(match header.addresses {
        ppp::v1::Addresses::Tcp4(ip) => Some(SocketAddr::from((ip.source_address, ip.source_port))),
        ppp::v1::Addresses::Tcp6(ip) => Some(SocketAddr::from((ip.source_address, ip.source_port))),
        ppp::v1::Addresses::Unknown => None,
    })
}

fn v2_source(bytes: &[u8]) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let header = ppp::v2::Header::try_from(bytes)
        .map_err(|err| ProxyHeaderError::Invalid(err.to_string()))?;
    if header.command == ppp::v2::Command::Local {
        return Ok(None);
    }
    Ok(match header.addresses {
        ppp::v2::Addresses::IPv4(ip) => Some(SocketAddr::from((ip.source_address, ip.source_port))),
        ppp::v2::Addresses::IPv6(ip) => Some(SocketAddr::from((ip.source_address, ip.source_port))),
        ppp::v2::Addresses::Unspecified | ppp::v2::Addresses::Unix(_) => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn parse(bytes: &[u8]) -> (Result<Option<SocketAddr>, ProxyHeaderError>, Vec<u8>) {
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(bytes).await.unwrap();
        drop(client);
        let result = read_header(&mut server, Duration::from_secs(1)).await;
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        (result, rest)
    }

    #[tokio::test]
    async fn v1_gives_the_source_and_leaves_the_rest() {
        let (source, rest) =
            parse(b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\nGET / HTTP/1.1\r\n").await;
        assert_eq!(source.unwrap(), Some("203.0.113.7:51234".parse().unwrap()));
        assert_eq!(rest, b"GET / HTTP/1.1\r\n");
        let (source, _) = parse(b"PROXY TCP6 2001:db8::1 ::1 4000 443\r\n").await;
        assert_eq!(source.unwrap(), Some("[2001:db8::1]:4000".parse().unwrap()));
        let (source, rest) = parse(b"PROXY UNKNOWN\r\nX").await;
        assert_eq!(source.unwrap(), None);
        assert_eq!(rest, b"X");
    }

    #[tokio::test]
    async fn v2_gives_the_source_and_leaves_the_rest() {
        let header = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            (
                "198.51.100.9:6000".parse::<SocketAddr>().unwrap(),
                "10.0.0.1:443".parse::<SocketAddr>().unwrap(),
            ),
        )
        .write_tlv(ppp::v2::Type::NoOp, b"pad")
        .unwrap()
        .build()
        .unwrap();
        let mut bytes = header.clone();
        bytes.extend_from_slice(b"\x16\x03\x01");
        let (source, rest) = parse(&bytes).await;
        assert_eq!(source.unwrap(), Some("198.51.100.9:6000".parse().unwrap()));
        assert_eq!(rest, b"\x16\x03\x01");

        let local = ppp::v2::Builder::new(
            ppp::v2::Version::Two | ppp::v2::Command::Local,
            ppp::v2::AddressFamily::Unspecified | ppp::v2::Protocol::Unspecified,
        )
        .build()
        .unwrap();
        assert_eq!(parse(&local).await.0.unwrap(), None);
    }

    #[tokio::test]
    async fn anything_else_is_refused() {
        let (result, _) = parse(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(
            matches!(result, Err(ProxyHeaderError::Missing)),
            "{result:?}"
        );
        let (result, _) = parse(b"PROXY TCP4 nonsense here\r\n").await;
        assert!(
            matches!(result, Err(ProxyHeaderError::Invalid(_))),
            "{result:?}"
        );
        let long = format!("PROXY TCP4 {}\r\n", "1".repeat(200));
        let (result, _) = parse(long.as_bytes()).await;
        assert!(
            matches!(result, Err(ProxyHeaderError::Invalid(_))),
            "{result:?}"
        );
        let (result, _) = parse(b"PROXY TCP4").await;
        assert!(matches!(result, Err(ProxyHeaderError::Io(_))), "{result:?}");
    }

    #[tokio::test]
    async fn a_silent_peer_times_out() {
        let (_client, mut server) = tokio::io::duplex(64);
        let result = read_header(&mut server, Duration::from_millis(50)).await;
        assert!(
            matches!(result, Err(ProxyHeaderError::Timeout(_))),
            "{result:?}"
        );
    }
}
