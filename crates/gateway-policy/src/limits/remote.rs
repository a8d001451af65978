//! The Redis limit store: every limit of one request is checked and charged by one call of
//! `gcra.lua` (EVALSHA, loaded on first use), so replicas share limits without races.

use super::gcra::Verdict;
use super::{Line, Outcome};
use crate::redis_link::{RedisLink, RedisUnavailable};
use redis::{ErrorKind, RedisError, Script};

pub(super) struct RemoteStore {
    link: RedisLink,
    script: Script,
    prefix: String,
}

impl RemoteStore {
    pub fn new(link: RedisLink, prefix: String) -> Self {
        Self {
            link,
            script: Script::new(include_str!("gcra.lua")),
            prefix,
        }
    }

    /// `<prefix><scope>:<req|tok>:<name>`; the name comes last, so any characters in it
    /// cannot make two limits share a key.
    pub fn key(&self, line: &Line) -> String {
        format!(
            "{}{}:{}:{}",
            self.prefix,
            line.scope.as_str(),
            line.dimension.key_part(),
            line.name
        )
    }

    /// Same contract as the in-process store: with `checking`, all lines are charged or none.
    pub async fn apply(&self, lines: &[Line], checking: bool) -> Result<Outcome, RedisUnavailable> {
        let mut invocation = self.script.prepare_invoke();
        invocation.arg(if checking { "1" } else { "0" });
        for line in lines {
            invocation
                .key(self.key(line))
                .arg(line.limit)
                .arg(line.units);
        }
        let reply: Vec<i64> = self
            .link
            .run(|mut conn| async move { invocation.invoke_async(&mut conn).await })
            .await?;
        parse(&reply, lines.len()).ok_or_else(|| {
            RedisUnavailable::Redis(RedisError::from((
                ErrorKind::UnexpectedReturnType,
                "rate-limit script returned a malformed reply",
            )))
        })
    }
}

fn parse(reply: &[i64], lines: usize) -> Option<Outcome> {
    let (&admitted, rest) = reply.split_first()?;
    if rest.len() != lines * 3 {
        return None;
    }
    let verdicts: Vec<Verdict> = rest
        .chunks_exact(3)
        .map(|v| Verdict {
            remaining: u64::try_from(v[0]).unwrap_or(0),
            reset_us: u64::try_from(v[1]).unwrap_or(0),
            retry_us: u64::try_from(v[2]).unwrap_or(0),
        })
        .collect();
    let admitted = admitted == 1;
    // A rejection must name a reason; one that does not is not a reply we understand.
    if !admitted && verdicts.iter().all(|v| v.retry_us == 0) {
        return None;
    }
    Some(Outcome { admitted, verdicts })
}
