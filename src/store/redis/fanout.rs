//! The fan-out to N Redis servers (Redlock): one request sent to every server at once, decided as
//! soon as the answers in hand settle it (the rules are [`quorum`](super::quorum)'s), with a
//! per-server timeout far below the term. A server that has not answered by then does not hold the
//! request up; its call is handed back, to be dropped or finished in the background when its late
//! answer still matters.

use std::{future::Future, time::Duration};

use futures::{StreamExt, stream::FuturesUnordered};

use super::{node::Node, quorum::Answer};
use crate::store::StoreError;

/// Calls still running when a fan-out was decided (none with one server).
pub(crate) type Stragglers<F> = Option<FuturesUnordered<F>>;

/// What a fan-out decided, on which answers, and the calls still running.
pub(crate) struct Gathered<V, T, F> {
    /// What `decide` said.
    pub decision: V,
    /// The answers it was made on; a server that did not answer in time has an error.
    pub answers: Vec<Answer<T>>,
    /// Calls still running; each yields `(server, answer)`.
    pub stragglers: Stragglers<F>,
}

/// Sends `call(i)` to every server `i` of `nodes` at once and, after each answer, asks `decide`
/// whether the answers so far settle the request. Answers missing `per_server` after the start
/// count as failed. With one server there is nothing to decide early: its call is simply awaited
/// (it is bounded by the operation timeout).
pub(crate) async fn gather<T, F, V>(
    nodes: &[&Node],
    per_server: Duration,
    call: impl Fn(usize) -> F,
    mut decide: impl FnMut(&[Answer<T>]) -> Option<V>,
) -> Gathered<V, T, F>
where
    F: Future<Output = (usize, Result<T, StoreError>)>,
{
    if nodes.len() == 1 {
        // Boxed, as `join_all` would: inline, the call (over a kilobyte and a half) would make
        // every future that awaits a store command that much larger, and adapters nest several.
        let (_, answer) = Box::pin(call(0)).await;
        let answers = vec![Some(answer)];
        return Gathered {
            decision: decide(&answers).expect("a single answer settles every request"),
            answers,
            stragglers: None,
        };
    }
    let mut answers: Vec<Answer<T>> = nodes.iter().map(|_| None).collect();
    let mut running: FuturesUnordered<F> = (0..nodes.len()).map(call).collect();
    let deadline = tokio::time::Instant::now() + per_server;
    loop {
        if let Some(decision) = decide(&answers) {
            return Gathered {
                decision,
                answers,
                stragglers: Some(running),
            };
        }
        match tokio::time::timeout_at(deadline, running.next()).await {
            Ok(Some((i, answer))) => answers[i] = Some(answer),
            Ok(None) | Err(_) => {
                for (node, answer) in nodes.iter().zip(&mut answers) {
                    if answer.is_none() {
                        *answer = Some(Err(StoreError::Unavailable(format!(
                            "Redis {}: no answer within the per-server timeout of {per_server:?}",
                            node.label()
                        ))));
                    }
                }
                return Gathered {
                    decision: decide(&answers).expect("every server has answered or failed"),
                    answers,
                    stragglers: Some(running),
                };
            }
        }
    }
}
