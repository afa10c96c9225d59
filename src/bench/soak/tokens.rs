//! The fencing-token check: every token any client sees, per election, against those seen
//! before the observation that saw it began.

use std::collections::HashMap;

use serde::Serialize;

/// Where a token was seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Sighting {
    /// e.g. `gRPC campaign`, `SSE watch`.
    pub by: String,
    /// The client (candidate or stream).
    pub client: String,
}

/// A token lower than one seen before the observation that saw it began.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Regression {
    /// The election.
    pub election: String,
    /// The token seen.
    pub token: u64,
    /// The highest token seen before the observation began.
    pub floor: u64,
    /// Where.
    pub seen: Sighting,
    /// Seconds into the run.
    pub at_seconds: f64,
}

/// The fencing tokens every client has seen, per election.
///
/// "Seen earlier" means: by an observation that ended before this one began. A request takes
/// [`TokenLedger::floor`] when it is sent and hands it back with the token its answer carried;
/// a stream takes it when it connects, then raises it with every event. A token below its floor
/// is a regression. A token below the highest seen so far but not below its floor came from a
/// request that overlapped the one that saw the higher token — its answer may have been decided
/// first — and is only counted (`overlapping_lower` of the summary).
#[derive(Debug, Default)]
pub struct TokenLedger {
    highest: HashMap<String, u64>,
    checked: u64,
    overlapping_lower: u64,
    regressions: u64,
    examples: Vec<Regression>,
}

/// Regressions kept in full for the report.
const REGRESSION_EXAMPLES: usize = 20;

impl TokenLedger {
    /// The highest token seen on `election` so far: no later observation may see less.
    pub fn floor(&self, election: &str) -> u64 {
        self.highest.get(election).copied().unwrap_or(0)
    }

    /// `token` was seen on `election` by an observation that began when its floor was `floor`;
    /// 0 (nobody leads; a resign's answer) carries no token. Answers the regression, if it is one.
    pub fn saw(
        &mut self,
        election: &str,
        floor: u64,
        token: u64,
        seen: impl FnOnce() -> Sighting,
        at_seconds: f64,
    ) -> Option<Regression> {
        if token == 0 {
            return None;
        }
        self.checked += 1;
        let highest = self.highest.entry(election.to_owned()).or_default();
        let regression = if token < floor {
            self.regressions += 1;
            let regression = Regression {
                election: election.to_owned(),
                token,
                floor,
                seen: seen(),
                at_seconds,
            };
            if self.examples.len() < REGRESSION_EXAMPLES {
                self.examples.push(regression.clone());
            }
            Some(regression)
        } else {
            if token < *highest {
                self.overlapping_lower += 1;
            }
            None
        };
        *highest = (*highest).max(token);
        regression
    }

    pub(super) fn summary(&self) -> TokenSummary {
        TokenSummary {
            elections: self.highest.len(),
            checked: self.checked,
            regressions: self.regressions,
            overlapping_lower: self.overlapping_lower,
            examples: self.examples.clone(),
        }
    }
}

/// The token check's figures.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenSummary {
    /// Elections with at least one token seen.
    pub elections: usize,
    /// Tokens checked (answers of campaign, extend and handover; stream events naming a leader).
    pub checked: u64,
    /// Tokens lower than one seen before the observation began: must be 0.
    pub regressions: u64,
    /// Tokens lower than the highest seen when they arrived, from overlapping requests.
    pub overlapping_lower: u64,
    /// The first regressions, in full.
    pub examples: Vec<Regression>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sighting() -> Sighting {
        Sighting {
            by: "gRPC campaign".into(),
            client: "c".into(),
        }
    }

    #[test]
    fn a_token_below_one_seen_before_the_request_was_sent_is_a_regression() {
        let mut ledger = TokenLedger::default();
        let floor = ledger.floor("e");
        assert_eq!(ledger.saw("e", floor, 10, sighting, 1.0), None);
        let floor = ledger.floor("e");
        assert_eq!(floor, 10);
        let regression = ledger
            .saw("e", floor, 9, sighting, 2.0)
            .expect("a regression");
        assert_eq!((regression.token, regression.floor), (9, 10));
        assert_eq!(ledger.summary().regressions, 1);
        assert_eq!(ledger.summary().examples, vec![regression]);
    }

    #[test]
    fn a_lower_token_from_a_request_that_overlapped_the_higher_one_is_not_a_regression() {
        let mut ledger = TokenLedger::default();
        // Both sent before either answered: the one decided first may be read last.
        let (first, second) = (ledger.floor("e"), ledger.floor("e"));
        assert_eq!(ledger.saw("e", first, 11, sighting, 1.0), None);
        assert_eq!(ledger.saw("e", second, 10, sighting, 1.0), None);
        assert_eq!(ledger.summary().overlapping_lower, 1);
        assert_eq!(ledger.summary().regressions, 0);
        assert_eq!(ledger.floor("e"), 11, "the highest stays the floor");
    }

    #[test]
    fn no_token_and_other_elections_do_not_count() {
        let mut ledger = TokenLedger::default();
        ledger.saw("a", 0, 100, sighting, 1.0);
        assert_eq!(
            ledger.saw("a", 100, 0, sighting, 1.0),
            None,
            "0: nobody leads"
        );
        assert_eq!(ledger.saw("b", ledger.floor("b"), 5, sighting, 1.0), None);
        let summary = ledger.summary();
        assert_eq!(
            (summary.checked, summary.elections, summary.regressions),
            (2, 2, 0)
        );
    }

    #[test]
    fn only_the_first_regressions_are_kept_in_full() {
        let mut ledger = TokenLedger::default();
        ledger.saw("e", 0, 1_000, sighting, 0.0);
        for token in 1..=50 {
            ledger.saw("e", 1_000, token, sighting, 0.0);
        }
        let summary = ledger.summary();
        assert_eq!(summary.regressions, 50);
        assert_eq!(summary.examples.len(), REGRESSION_EXAMPLES);
    }
}
