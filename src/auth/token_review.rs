//! Kubernetes ServiceAccount tokens (`EA_AUTH_KUBERNETES`), verified by the API server with the
//! TokenReview API for the agent's audience (`EA_AUTH_AUDIENCE`).
//!
//! Answers are cached briefly, by the token's SHA-256 digest (the token itself is not kept):
//! a client sending the same token with every request costs one review per 10 s, and a flood of
//! one bad token one per 2 s. The cache is bounded; when full, expired answers go first, then
//! the one expiring soonest. A review the API server could not answer is not cached.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::{Api, PostParams};

use super::{
    Identity,
    tokens::{TokenDigest, token_digest},
};

/// How long an authenticated answer is reused: a revoked token (its pod deleted) keeps working
/// this long at most.
pub const AUTHENTICATED_FOR: Duration = Duration::from_secs(10);
/// How long a refusal is reused: a token that just became valid waits this long at most.
pub const REFUSED_FOR: Duration = Duration::from_secs(2);
/// Most answers cached.
pub const CACHE_ENTRIES: usize = 4_096;

/// Verifies bearer tokens with the API server's TokenReview API.
pub struct TokenReviewer {
    api: Api<TokenReview>,
    audience: String,
    cache: Mutex<ReviewCache>,
    authenticated_for: Duration,
    refused_for: Duration,
}

impl TokenReviewer {
    /// Reviews through `client`, for tokens issued to `audience`.
    pub fn new(client: kube::Client, audience: impl Into<String>) -> Self {
        Self::with_cache(
            client,
            audience,
            CACHE_ENTRIES,
            AUTHENTICATED_FOR,
            REFUSED_FOR,
        )
    }

    /// As [`new`](Self::new), with another cache size and lifetimes (for tests).
    pub fn with_cache(
        client: kube::Client,
        audience: impl Into<String>,
        entries: usize,
        authenticated_for: Duration,
        refused_for: Duration,
    ) -> Self {
        Self {
            api: Api::all(client),
            audience: audience.into(),
            cache: Mutex::new(ReviewCache {
                answers: HashMap::new(),
                capacity: entries.max(1),
            }),
            authenticated_for,
            refused_for,
        }
    }

    /// Who `token` stands for, `None` when the API server does not authenticate it for the
    /// audience; an error when the API server could not be asked.
    pub async fn review(&self, token: &str) -> Result<Option<Identity>, kube::Error> {
        let key = token_digest(token);
        if let Some(answer) = self.cache().get(&key, Instant::now()) {
            return Ok(answer);
        }
        let request = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let answer = self.api.create(&PostParams::default(), &request).await?;
        let identity = identity_of(answer.status, &self.audience);
        let lifetime = if identity.is_some() {
            self.authenticated_for
        } else {
            self.refused_for
        };
        let now = Instant::now();
        self.cache()
            .insert(key, identity.clone(), now + lifetime, now);
        Ok(identity)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, ReviewCache> {
        // The cache holds no invariant a panicking holder could break halfway.
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The identity a review's answer grants: authenticated, for our audience (an API server that
/// does not say which audiences it checked may not have checked ours), with a user name.
fn identity_of(status: Option<TokenReviewStatus>, audience: &str) -> Option<Identity> {
    let status = status?;
    if status.authenticated != Some(true) {
        return None;
    }
    if !status
        .audiences
        .as_ref()
        .is_some_and(|a| a.iter().any(|a| a == audience))
    {
        tracing::warn!(
            audience,
            answered = ?status.audiences,
            "a TokenReview authenticated a token without confirming the audience; refused"
        );
        return None;
    }
    let user = status.user?;
    let name = user.username.filter(|name| !name.is_empty())?;
    Some(Identity {
        user: name,
        uid: user.uid.unwrap_or_default(),
        groups: user.groups.unwrap_or_default(),
    })
}

/// Answers by token digest, each with the instant it expires.
struct ReviewCache {
    answers: HashMap<TokenDigest, (Instant, Option<Identity>)>,
    capacity: usize,
}

impl ReviewCache {
    fn get(&mut self, key: &TokenDigest, now: Instant) -> Option<Option<Identity>> {
        match self.answers.get(key) {
            Some((until, answer)) if *until > now => Some(answer.clone()),
            Some(_) => {
                self.answers.remove(key);
                None
            }
            None => None,
        }
    }

    fn insert(&mut self, key: TokenDigest, answer: Option<Identity>, until: Instant, now: Instant) {
        if self.answers.len() >= self.capacity && !self.answers.contains_key(&key) {
            self.answers.retain(|_, (until, _)| *until > now);
            if self.answers.len() >= self.capacity
                && let Some(soonest) = self
                    .answers
                    .iter()
                    .min_by_key(|(_, (until, _))| *until)
                    .map(|(key, _)| *key)
            {
                self.answers.remove(&soonest);
            }
        }
        self.answers.insert(key, (until, answer));
    }
}

#[cfg(test)]
mod tests {
    use axum::http::{Request, Response};
    use kube::client::Body;
    use serde_json::{Value, json};
    use tower_test::mock::{self, Handle};

    use super::*;

    type ApiServer = Handle<Request<Body>, Response<Body>>;

    fn reviewer(authenticated_for: Duration, refused_for: Duration) -> (TokenReviewer, ApiServer) {
        let (service, api) = mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(service, "default");
        (
            TokenReviewer::with_cache(client, "election-agent", 16, authenticated_for, refused_for),
            api,
        )
    }

    /// Waits for the next TokenReview, checks it, answers `status` (or `code` with a Status),
    /// and returns the token and audiences it carried.
    async fn answer(api: &mut ApiServer, code: u16, status: Value) -> (String, Value) {
        let (request, respond) = tokio::time::timeout(Duration::from_secs(5), api.next_request())
            .await
            .expect("a TokenReview within 5 s")
            .expect("the client is alive");
        assert_eq!(request.method(), "POST");
        assert_eq!(
            request.uri().path(),
            "/apis/authentication.k8s.io/v1/tokenreviews"
        );
        let body = http_body_util::BodyExt::collect(request.into_body())
            .await
            .unwrap()
            .to_bytes();
        let review: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(review["kind"], "TokenReview");
        assert_eq!(review["apiVersion"], "authentication.k8s.io/v1");
        let spec = review["spec"].clone();
        let reply = if code == 201 {
            let mut reply = review;
            reply["status"] = status;
            reply
        } else {
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code,
                   "reason": "Forbidden", "message": "tokenreviews is forbidden"})
        };
        respond.send_response(
            Response::builder()
                .status(code)
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                .unwrap(),
        );
        (
            spec["token"].as_str().unwrap().to_owned(),
            spec["audiences"].clone(),
        )
    }

    fn authenticated(audiences: Value) -> Value {
        json!({"authenticated": true, "audiences": audiences, "user": {
            "username": "system:serviceaccount:shop:web", "uid": "uid-7",
            "groups": ["system:serviceaccounts", "system:serviceaccounts:shop", "system:authenticated"]}})
    }

    #[tokio::test]
    async fn a_token_the_api_server_authenticates_for_our_audience_is_its_service_account() {
        let (reviewer, mut api) = reviewer(AUTHENTICATED_FOR, REFUSED_FOR);
        let (reviewed, answered) = tokio::join!(
            reviewer.review("sa-token"),
            answer(&mut api, 201, authenticated(json!(["election-agent"])))
        );
        assert_eq!(answered, ("sa-token".to_owned(), json!(["election-agent"])));
        let identity = reviewed.unwrap().expect("authenticated");
        assert_eq!(identity.user, "system:serviceaccount:shop:web");
        assert_eq!(identity.uid, "uid-7");
        assert_eq!(
            identity.groups,
            [
                "system:serviceaccounts",
                "system:serviceaccounts:shop",
                "system:authenticated"
            ]
        );
    }

    #[tokio::test]
    async fn a_token_not_authenticated_or_not_for_our_audience_is_refused() {
        for status in [
            json!({"authenticated": false, "error": "token expired"}),
            json!({}),
            authenticated(json!(["https://kubernetes.default.svc"])),
            authenticated(Value::Null),
            json!({"authenticated": true, "audiences": ["election-agent"], "user": {}}),
        ] {
            let (reviewer, mut api) = reviewer(AUTHENTICATED_FOR, REFUSED_FOR);
            let (reviewed, _) = tokio::join!(
                reviewer.review("bad"),
                answer(&mut api, 201, status.clone())
            );
            assert_eq!(reviewed.unwrap(), None, "{status}");
        }
    }

    #[tokio::test]
    async fn answers_are_reused_until_they_expire_refusals_sooner() {
        let (reviewer, mut api) = reviewer(Duration::from_millis(600), Duration::from_millis(200));
        let (first, _) = tokio::join!(
            reviewer.review("good"),
            answer(&mut api, 201, authenticated(json!(["election-agent"])))
        );
        let (refused, _) = tokio::join!(
            reviewer.review("bad"),
            answer(&mut api, 201, json!({"authenticated": false}))
        );
        assert!(first.unwrap().is_some() && refused.unwrap().is_none());
        // From the cache: no request reaches the API server (the mock would wait forever).
        for _ in 0..3 {
            assert!(reviewer.review("good").await.unwrap().is_some());
            assert!(reviewer.review("bad").await.unwrap().is_none());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            reviewer.review("good").await.unwrap().is_some(),
            "still cached"
        );
        let (again, (token, _)) = tokio::join!(
            reviewer.review("bad"),
            answer(&mut api, 201, json!({"authenticated": false}))
        );
        assert_eq!(
            (again.unwrap(), token.as_str()),
            (None, "bad"),
            "refusal expired"
        );
        tokio::time::sleep(Duration::from_millis(400)).await;
        let (again, (token, _)) = tokio::join!(
            reviewer.review("good"),
            answer(&mut api, 201, authenticated(json!(["election-agent"])))
        );
        assert!(again.unwrap().is_some());
        assert_eq!(token, "good", "authentication expired");
    }

    #[tokio::test]
    async fn an_api_server_error_is_an_error_and_is_not_cached() {
        let (reviewer, mut api) = reviewer(AUTHENTICATED_FOR, REFUSED_FOR);
        let (failed, _) = tokio::join!(reviewer.review("t"), answer(&mut api, 403, json!({})));
        assert!(failed.is_err());
        let (reviewed, _) = tokio::join!(
            reviewer.review("t"),
            answer(&mut api, 201, authenticated(json!(["election-agent"])))
        );
        assert!(reviewed.unwrap().is_some(), "asked again");
    }

    #[test]
    fn the_cache_is_bounded_dropping_expired_answers_first_then_the_soonest_to_expire() {
        let now = Instant::now();
        let at = |ms| now + Duration::from_millis(ms);
        let mut cache = ReviewCache {
            answers: HashMap::new(),
            capacity: 3,
        };
        let key = |n: u8| [n; 32];
        cache.insert(key(1), None, at(50), now);
        cache.insert(key(2), None, at(300), now);
        cache.insert(key(3), None, at(200), now);
        // Full, nothing expired: the soonest to expire (1) goes.
        cache.insert(key(4), None, at(400), now);
        assert_eq!(cache.answers.len(), 3);
        assert!(cache.get(&key(1), now).is_none());
        // Full, 3 expired by then: it goes, and only it.
        cache.insert(key(5), None, at(500), at(250));
        assert_eq!(cache.answers.len(), 3);
        for (n, kept) in [(2, true), (3, false), (4, true), (5, true)] {
            assert_eq!(cache.get(&key(n), at(250)).is_some(), kept, "{n}");
        }
        // Replacing an entry never evicts another.
        cache.insert(key(2), None, at(600), at(250));
        assert_eq!(cache.answers.len(), 3);
    }
}
