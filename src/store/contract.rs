//! The lease-store contract: the semantics every backend must show identically.
//!
//! `run` drives a store through every command in every lease state with real time and short
//! terms. Each backend's tests call it unchanged.

use std::time::Duration;

use super::{LeaseStore, StoreEvent};
use crate::lease::{
    ChangeCause, Command, ElectionKey, Expected, FencingToken, Name, Outcome, Term, Version,
};

const SHORT: Term = Term::from_millis(150);
const LONG: Term = Term::from_millis(10_000);
/// Comfortably longer than `SHORT`, so the lease has certainly expired.
const PAST_SHORT: Duration = Duration::from_millis(300);

fn name(s: &str) -> Name {
    Name::parse("test", s).expect("valid test name")
}

fn key(kind: &str, election: &str) -> ElectionKey {
    ElectionKey {
        kind: name(kind),
        election: name(election),
    }
}

fn campaign(candidate: &str, term: Term) -> Command {
    Command::Campaign {
        candidate: name(candidate),
        term,
    }
}

fn extend(leader: &str, term: Term) -> Command {
    Command::Extend {
        leader: name(leader),
        term,
    }
}

fn resign(leader: &str) -> Command {
    Command::Resign {
        leader: name(leader),
    }
}

fn handover(leader: &str, term: Term) -> Command {
    Command::Handover {
        leader: name(leader),
        term,
        expected: Default::default(),
    }
}

async fn leading<S: LeaseStore>(
    store: &S,
    election: &ElectionKey,
    command: Command,
) -> FencingToken {
    match store.execute(election, command.clone()).await {
        Ok(Outcome::Leading { token }) | Ok(Outcome::HandedOver { token }) => token,
        other => panic!("{command:?} on {election}: expected to lead, got {other:?}"),
    }
}

async fn leader_of<S: LeaseStore>(store: &S, election: &ElectionKey) -> Option<(String, u64)> {
    store
        .leadership(election)
        .await
        .expect("store available")
        .leader
        .map(|info| (info.leader.to_string(), info.token.0))
}

/// Runs the whole contract against `store`. Election names are unique per run, so a persistent
/// backend may be reused between runs.
pub(crate) async fn run<S: LeaseStore>(store: &S) {
    let run = format!(
        "contract-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    );
    store.check().await.expect("store is ready");
    campaign_extend_resign_handover(store, &key(&run, "main")).await;
    expiry(store, &key(&run, "expiry")).await;
    listing_and_kinds(store, &run).await;
    kinds_and_names_that_read_alike_are_separate_elections(store, &run).await;
    changes_are_announced(store, &key(&run, "observed")).await;
    conditional_handover(store, &key(&run, "conditional")).await;
}

async fn campaign_extend_resign_handover<S: LeaseStore>(store: &S, election: &ElectionKey) {
    assert_eq!(leader_of(store, election).await, None);
    assert_eq!(
        store.execute(election, extend("a", LONG)).await.unwrap(),
        Outcome::NotHolder { holder: None },
        "extend with no leader"
    );
    assert_eq!(
        store.execute(election, resign("a")).await.unwrap(),
        Outcome::Resigned,
        "resign with no leader succeeds"
    );

    let first = leading(store, election, campaign("a", LONG)).await;
    assert_eq!(
        leader_of(store, election).await,
        Some(("a".into(), first.0))
    );
    assert_eq!(
        store.execute(election, campaign("b", LONG)).await.unwrap(),
        Outcome::Following {
            leader: name("a"),
            token: first
        },
        "campaign by another candidate returns the current leader"
    );
    assert_eq!(
        leading(store, election, campaign("a", LONG)).await,
        first,
        "campaign by holder renews"
    );
    assert_eq!(
        leading(store, election, extend("a", LONG)).await,
        first,
        "extend by holder renews"
    );
    assert_eq!(
        store.execute(election, extend("b", LONG)).await.unwrap(),
        Outcome::NotHolder {
            holder: Some(name("a"))
        },
        "extend by another candidate"
    );
    assert_eq!(
        store.execute(election, resign("b")).await.unwrap(),
        Outcome::NotHolder {
            holder: Some(name("a"))
        },
        "resign by another candidate"
    );
    assert_eq!(
        leader_of(store, election).await,
        Some(("a".into(), first.0)),
        "unchanged"
    );

    let handed = leading(store, election, handover("c", LONG)).await;
    assert!(handed > first, "handover gives a new token");
    assert_eq!(
        leader_of(store, election).await,
        Some(("c".into(), handed.0))
    );

    assert_eq!(
        store.execute(election, resign("c")).await.unwrap(),
        Outcome::Resigned
    );
    assert_eq!(
        leader_of(store, election).await,
        None,
        "resign deletes the lease at once"
    );
    let after_resign = leading(store, election, campaign("a", LONG)).await;
    assert!(
        after_resign > handed,
        "token increases after resign, even for a former holder"
    );
    assert_eq!(
        store.execute(election, resign("a")).await.unwrap(),
        Outcome::Resigned
    );
}

/// A handover conditional on the live lease: done over the expected holder or token, refused
/// (naming the live holder, changing nothing) over any other, and over no lease at all.
async fn conditional_handover<S: LeaseStore>(store: &S, election: &ElectionKey) {
    let handover_if =
        |leader: &str, holder: Option<&str>, token: Option<FencingToken>| Command::Handover {
            leader: name(leader),
            term: LONG,
            expected: Expected {
                leader: holder.map(name),
                token,
            },
        };
    let refused = |holder: Option<&str>| Outcome::NotHolder {
        holder: holder.map(name),
    };
    assert_eq!(
        store
            .execute(election, handover_if("b", Some("a"), None))
            .await
            .unwrap(),
        refused(None),
        "nobody leads: not the expected lease"
    );
    assert_eq!(leader_of(store, election).await, None, "unchanged");
    let first = leading(store, election, campaign("a", LONG)).await;
    for (holder, token) in [
        (Some("z"), None),
        (None, Some(FencingToken(first.0 + 1))),
        (Some("a"), Some(FencingToken(first.0 - 1))),
    ] {
        assert_eq!(
            store
                .execute(election, handover_if("b", holder, token))
                .await
                .unwrap(),
            refused(Some("a")),
            "expected {holder:?} {token:?} over a's lease {first:?}"
        );
    }
    assert_eq!(
        leader_of(store, election).await,
        Some(("a".into(), first.0)),
        "refusals change nothing"
    );
    let handed = leading(store, election, handover_if("b", Some("a"), Some(first))).await;
    assert!(handed > first);
    assert_eq!(
        leader_of(store, election).await,
        Some(("b".into(), handed.0))
    );
    assert_eq!(
        store
            .execute(election, handover_if("c", Some("a"), None))
            .await
            .unwrap(),
        refused(Some("b")),
        "a second handover over the same expected lease is refused: it moved"
    );
    assert_eq!(
        store.execute(election, resign("b")).await.unwrap(),
        Outcome::Resigned
    );
}

async fn expiry<S: LeaseStore>(store: &S, election: &ElectionKey) {
    let first = leading(store, election, campaign("a", SHORT)).await;
    let info = store
        .leadership(election)
        .await
        .unwrap()
        .leader
        .expect("live lease");
    assert!(
        info.ttl_ms >= 1 && info.ttl_ms <= SHORT.as_millis(),
        "ttl {}",
        info.ttl_ms
    );

    tokio::time::sleep(PAST_SHORT).await;
    assert_eq!(
        leader_of(store, election).await,
        None,
        "expired lease is not reported"
    );
    let back = leading(store, election, extend("a", SHORT)).await;
    assert!(
        back > first,
        "holder taking back its expired lease gets a new token"
    );

    tokio::time::sleep(PAST_SHORT).await;
    assert_eq!(
        store.execute(election, resign("a")).await.unwrap(),
        Outcome::Resigned
    );
    assert_eq!(
        store.execute(election, extend("a", SHORT)).await.unwrap(),
        Outcome::NotHolder { holder: None },
        "a lease resigned after expiry cannot be revived by extend"
    );
    assert_eq!(
        store.execute(election, extend("b", SHORT)).await.unwrap(),
        Outcome::NotHolder { holder: None },
        "a non-holder cannot extend an expired lease"
    );
    let other = leading(store, election, campaign("b", LONG)).await;
    assert!(
        other > back,
        "first campaigner after expiry wins with a higher token"
    );
    assert_eq!(
        store.execute(election, extend("a", LONG)).await.unwrap(),
        Outcome::NotHolder {
            holder: Some(name("b"))
        },
        "the former holder cannot take it back once someone else has"
    );
}

async fn listing_and_kinds<S: LeaseStore>(store: &S, run: &str) {
    let kind = format!("{run}-list");
    let other_kind = format!("{run}-other");
    leading(store, &key(&kind, "z"), campaign("z1", LONG)).await;
    leading(store, &key(&kind, "a"), campaign("a1", LONG)).await;
    leading(store, &key(&kind, "short"), campaign("s1", SHORT)).await;
    leading(store, &key(&kind, "gone"), campaign("g1", LONG)).await;
    store
        .execute(&key(&kind, "gone"), resign("g1"))
        .await
        .unwrap();
    leading(store, &key(&other_kind, "a"), campaign("other", LONG)).await;
    tokio::time::sleep(PAST_SHORT).await;

    let listed: Vec<_> = store
        .leaders(&name(&kind))
        .await
        .unwrap()
        .into_iter()
        .map(|(election, info)| (election.to_string(), info.leader.to_string()))
        .collect();
    assert_eq!(
        listed,
        [("a".into(), "a1".into()), ("z".into(), "z1".into())],
        "only live leases of the kind, sorted by election"
    );
    assert_eq!(
        leader_of(store, &key(&other_kind, "a")).await.map(|l| l.0),
        Some("other".into()),
        "the same election name in another kind is another election"
    );
}

/// Kinds and names may both contain `/`: kind `team` with election `b/c` and kind `team/b` with
/// election `c` are two elections, and a kind's listing never shows another kind's, even one
/// whose name starts with it.
async fn kinds_and_names_that_read_alike_are_separate_elections<S: LeaseStore>(
    store: &S,
    run: &str,
) {
    let team = format!("{run}-team");
    let (alice, bob) = (key(&team, "b/c"), key(&format!("{team}/b"), "c"));
    let alice_token = leading(store, &alice, campaign("alice", LONG)).await;
    leading(store, &bob, campaign("bob", LONG)).await;
    assert_eq!(
        store.execute(&bob, resign("bob")).await.unwrap(),
        Outcome::Resigned
    );
    assert_eq!(
        leader_of(store, &alice).await,
        Some(("alice".into(), alice_token.0)),
        "resigning one leaves the other"
    );
    assert_eq!(leader_of(store, &bob).await, None);

    let t2 = format!("{run}-t2");
    leading(store, &key(&t2, "x/y"), campaign("t2-leader", LONG)).await;
    leading(
        store,
        &key(&format!("{t2}/x"), "y"),
        campaign("t2x-leader", LONG),
    )
    .await;
    let listed = |kind: String| async move {
        store
            .leaders(&name(&kind))
            .await
            .unwrap()
            .into_iter()
            .map(|(election, info)| (election.to_string(), info.leader.to_string()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        listed(t2.clone()).await,
        [("x/y".into(), "t2-leader".into())]
    );
    assert_eq!(
        listed(format!("{t2}/x")).await,
        [("y".into(), "t2x-leader".into())]
    );
}

async fn changes_are_announced<S: LeaseStore>(store: &S, election: &ElectionKey) {
    let mut changes = store.subscribe();
    leading(store, election, campaign("a", LONG)).await;
    leading(store, election, extend("a", LONG)).await;
    leading(store, election, handover("b", LONG)).await;
    store.execute(election, resign("b")).await.unwrap();

    let mut seen = Vec::new();
    while seen.len() < 3 {
        let event = tokio::time::timeout(Duration::from_secs(2), changes.recv())
            .await
            .expect("change announced in time")
            .expect("no lag");
        if let StoreEvent::Changed(change) = event
            && change.election == *election
        {
            seen.push((
                change.cause,
                change.leader.leader.to_string(),
                change.version(),
            ));
        }
    }
    let (elected, handed) = (seen[0].2, seen[1].2);
    assert_eq!(
        seen,
        [
            // The renewal in between is not announced: leadership did not change.
            (ChangeCause::Elected, "a".into(), elected),
            (ChangeCause::HandedOver, "b".into(), handed),
            (ChangeCause::Resigned, "b".into(), Version(handed.0 + 1)),
        ],
        "each change once, in order, the resignation ending the lease handed over"
    );
    assert!(elected < handed);
    let read = store.leadership(election).await.unwrap();
    assert_eq!(
        (read.leader.clone(), read.version()),
        (None, Version(handed.0 + 1)),
        "a read after the resignation is at the resignation's version"
    );
}
