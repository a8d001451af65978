//! The rate-limit arithmetic (GCRA), as one pure function over the limits of one request.
//!
//! The in-process store calls [`decide`]; `gcra.lua` repeats it line for line for Redis. Any
//! change here must be made there too, or replicas and the fail-open fallback would disagree.
//!
//! Each limit (a scope, a dimension and a name) keeps a *debt*: how far its theoretical
//! arrival time lies ahead of now, in microseconds. Charging `u` units of a limit of `N` per
//! minute adds `u * 60 s / N`; time pays the debt back at one second per second. A charge fits
//! while the debt stays within the window (60 s), which admits a burst of `N` from empty and
//! then `N / 60` per second. Debt is kept relative to the time it was written rather than as
//! an absolute instant: absolute microseconds since 1970 lose sub-microsecond precision in an
//! f64 (Lua's only number type), and that rounding error would add up over a burst.

/// The period every limit is expressed over: one minute, in microseconds.
pub(super) const WINDOW_US: f64 = 60_000_000.0;

/// Ten nanoseconds of float slack: `N` charges of `W / N` can sum to a hair over `W`, and a
/// full burst must still fit.
pub(super) const SLACK_US: f64 = 0.01;

/// What one limit key stores.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct State {
    /// When the debt was written, in microseconds on the store's clock.
    pub at_us: u64,
    pub debt_us: f64,
}

impl State {
    /// The debt left at `now_us`.
    pub fn debt_at(self, now_us: u64) -> f64 {
        let elapsed = now_us.saturating_sub(self.at_us) as f64;
        (self.debt_us - elapsed).max(0.0)
    }
}

/// One limit of a request: its per-minute limit (at least 1) and the units to charge it
/// (0 only reports; negative refunds when settling).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Charge {
    pub limit: u64,
    pub units: i64,
}

/// What the caller learns about one limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Verdict {
    /// Whole units still available now (after the charge if the request was admitted).
    pub remaining: u64,
    /// Time until the limit is back to a full burst.
    pub reset_us: u64,
    /// When the request was rejected and this limit is one reason: time until it would fit.
    pub retry_us: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct Decision {
    pub admitted: bool,
    pub verdicts: Vec<Verdict>,
    /// The debt to store for each limit when admitted (limits charged 0 units stay as they were).
    pub debts: Vec<f64>,
}

/// Decides one request. With `checking`, either every limit takes its charge or none does;
/// without (settling tokens), the charges are applied as they are, debt and all.
pub(super) fn decide(charges: &[Charge], debts: &[f64], checking: bool) -> Decision {
    let after: Vec<f64> = charges
        .iter()
        .zip(debts)
        .map(|(charge, debt)| debt + charge.units as f64 * WINDOW_US / charge.limit as f64)
        .collect();
    let over = |i: usize| charges[i].units > 0 && after[i] > WINDOW_US + SLACK_US;
    let admitted = !checking || !(0..charges.len()).any(over);
    let mut verdicts = Vec::with_capacity(charges.len());
    let mut new_debts = Vec::with_capacity(charges.len());
    for (i, charge) in charges.iter().enumerate() {
        if admitted {
            let debt = after[i].max(0.0);
            new_debts.push(debt);
            verdicts.push(Verdict {
                remaining: remaining(debt, charge.limit),
                reset_us: ceil_us(debt),
                retry_us: 0,
            });
        } else {
            new_debts.push(debts[i]);
            verdicts.push(Verdict {
                remaining: remaining(debts[i], charge.limit),
                reset_us: ceil_us(debts[i]),
                retry_us: if over(i) {
                    ceil_us(after[i] - WINDOW_US)
                } else {
                    0
                },
            });
        }
    }
    Decision {
        admitted,
        verdicts,
        debts: new_debts,
    }
}

/// Whole units that would still fit on top of `debt`.
fn remaining(debt: f64, limit: u64) -> u64 {
    let limit_f = limit as f64;
    ((WINDOW_US - debt + SLACK_US) * limit_f / WINDOW_US)
        .floor()
        .clamp(0.0, limit_f) as u64
}

/// Rounds up to whole microseconds, forgiving the float slack so that an exact 6 s does not
/// turn into 6.000001 s.
fn ceil_us(us: f64) -> u64 {
    let us = us - SLACK_US;
    if us <= 0.0 { 0 } else { us.ceil() as u64 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn burst(limit: u64) -> (u64, f64) {
        let charge = [Charge { limit, units: 1 }];
        let mut debt = 0.0;
        let mut admitted = 0;
        loop {
            let decision = decide(&charge, &[debt], true);
            if !decision.admitted {
                return (admitted, debt);
            }
            assert_eq!(decision.verdicts[0].remaining, limit - admitted - 1);
            debt = decision.debts[0];
            admitted += 1;
        }
    }

    #[test]
    fn a_full_burst_fits_whatever_the_rounding() {
        for limit in [1, 3, 7, 13, 59, 61, 97, 1000, 9999, 65_537] {
            let (admitted, debt) = burst(limit);
            assert_eq!(admitted, limit, "limit {limit}");
            assert_eq!(ceil_us(debt), 60_000_000, "limit {limit}");
        }
    }

    #[test]
    fn rejection_reports_the_wait_for_one_more() {
        let charge = [Charge { limit: 7, units: 1 }];
        let decision = decide(&charge, &[WINDOW_US], true);
        assert!(!decision.admitted);
        assert_eq!(decision.verdicts[0].retry_us, 8_571_429);
        assert_eq!(decision.verdicts[0].remaining, 0);
        assert_eq!(decision.verdicts[0].reset_us, 60_000_000);
    }

    #[test]
    fn one_limit_over_rejects_all_and_keeps_every_debt() {
        let charges = [
            Charge {
                limit: 10,
                units: 1,
            },
            Charge { limit: 2, units: 1 },
        ];
        let decision = decide(&charges, &[0.0, WINDOW_US], true);
        assert!(!decision.admitted);
        assert_eq!(decision.debts, vec![0.0, WINDOW_US]);
        assert_eq!(decision.verdicts[0].retry_us, 0);
        assert_eq!(decision.verdicts[0].remaining, 10);
        assert_eq!(decision.verdicts[1].retry_us, 30_000_000);
    }

    #[test]
    fn settling_refunds_to_zero_and_charges_past_the_window() {
        let refund = decide(
            &[Charge {
                limit: 60,
                units: -90,
            }],
            &[30e6],
            false,
        );
        assert!(refund.admitted);
        assert_eq!(refund.debts, vec![0.0]);
        let extra = decide(
            &[Charge {
                limit: 60,
                units: 90,
            }],
            &[30e6],
            false,
        );
        assert_eq!(extra.debts, vec![120e6]);
        assert_eq!(extra.verdicts[0].remaining, 0);
    }

    #[test]
    fn debt_decays_with_elapsed_time() {
        let state = State {
            at_us: 1_000,
            debt_us: 500.0,
        };
        assert_eq!(state.debt_at(1_200), 300.0);
        assert_eq!(state.debt_at(5_000), 0.0);
        assert_eq!(state.debt_at(0), 500.0);
    }
}
