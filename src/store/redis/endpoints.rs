//! Where the Redis servers are: the configured URLs turned into one `rustis` configuration per
//! [`Node`](super::node::Node), each with a label free of credentials for logs and messages.

use rustis::client::{ClusterConfig, Config, SentinelConfig, ServerConfig};

use crate::config::{StoreConfig, StoreMode};

/// Why the store configuration cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("EA_REDIS_URLS: {0}")]
pub struct EndpointError(String);

/// The endpoints of a configuration, each with a label free of credentials.
pub(crate) fn endpoints(config: &StoreConfig) -> Result<Vec<(String, Config)>, EndpointError> {
    let urls: Vec<url::Url> = config
        .urls
        .iter()
        .map(|raw| {
            let url = url::Url::parse(raw)
                .map_err(|err| EndpointError(format!("{:?} is not a URL: {err}", redact(raw))))?;
            match url.scheme() {
                "redis" | "rediss" => Ok(url),
                other => Err(EndpointError(format!(
                    "{:?}: scheme {other:?} is not supported; use redis://",
                    redact(raw)
                ))),
            }
        })
        .collect::<Result<_, _>>()?;
    let host_port = |url: &url::Url| -> Result<(String, u16), EndpointError> {
        let host = url
            .host_str()
            .ok_or_else(|| EndpointError(format!("{:?} has no host", redact(url.as_str()))))?;
        Ok((host.to_owned(), url.port().unwrap_or(6379)))
    };
    let credentials = |url: &url::Url, config: &mut Config| -> Result<(), EndpointError> {
        if !url.username().is_empty() {
            config.username = Some(url.username().to_owned());
        }
        config.password = url.password().map(str::to_owned);
        let db = url.path().trim_start_matches('/');
        if !db.is_empty() {
            config.database = db.parse().map_err(|_| {
                EndpointError(format!(
                    "{:?}: database {db:?} is not a number",
                    redact(url.as_str())
                ))
            })?;
        }
        Ok(())
    };
    let first = urls
        .first()
        .ok_or_else(|| EndpointError("at least one Redis URL is needed".into()))?;
    match config.mode {
        StoreMode::Single => urls
            .iter()
            .map(|url| {
                let (host, port) = host_port(url)?;
                let mut endpoint = Config::default();
                endpoint.server = ServerConfig::Standalone {
                    host: host.clone(),
                    port,
                };
                credentials(url, &mut endpoint)?;
                Ok((format!("{host}:{port}"), endpoint))
            })
            .collect(),
        StoreMode::Failover => {
            let mut sentinel = SentinelConfig::default();
            sentinel.instances = urls.iter().map(host_port).collect::<Result<_, _>>()?;
            sentinel.service_name = config.master.clone();
            let mut endpoint = Config::default();
            credentials(first, &mut endpoint)?;
            endpoint.server = ServerConfig::Sentinel(sentinel);
            Ok(vec![(
                format!("sentinel master {}", config.master),
                endpoint,
            )])
        }
        StoreMode::Cluster => {
            let mut nodes = Vec::new();
            for url in &urls {
                nodes.push(host_port(url)?);
                for (name, value) in url.query_pairs() {
                    if name == "addr" {
                        let (host, port) = value.rsplit_once(':').ok_or_else(|| {
                            EndpointError(format!("addr={value:?} is not host:port"))
                        })?;
                        let port = port
                            .parse()
                            .map_err(|_| EndpointError(format!("addr={value:?}: bad port")))?;
                        nodes.push((host.to_owned(), port));
                    }
                }
            }
            let mut cluster = ClusterConfig::default();
            cluster.nodes = nodes;
            let mut endpoint = Config::default();
            credentials(first, &mut endpoint)?;
            endpoint.database = 0;
            endpoint.server = ServerConfig::Cluster(cluster);
            Ok(vec![("cluster".to_owned(), endpoint)])
        }
        StoreMode::Memory | StoreMode::Sharding => Err(EndpointError(format!(
            "EA_REDIS_MODE={} is not a Redis mode this agent serves",
            config.mode.as_str()
        ))),
    }
}

/// `raw` with any password replaced, for messages.
fn redact(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut url) if url.password().is_some() => {
            let _ = url.set_password(Some("***"));
            url.to_string()
        }
        _ => raw.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn store_config(mode: StoreMode, urls: &[&str], master: &str) -> StoreConfig {
        StoreConfig {
            mode,
            urls: urls.iter().map(|u| u.to_string()).collect(),
            master: master.to_owned(),
            operation_timeout: Duration::from_secs(1),
            server_timeout: Duration::from_millis(100),
            replica_acks: 1,
            key_prefix: "test".to_owned(),
            retention: Duration::from_secs(86_400),
        }
    }

    #[test]
    fn endpoints_follow_the_go_service_url_formats() {
        let endpoints =
            |mode, urls: &[&str], master: &str| endpoints(&store_config(mode, urls, master));
        let single = endpoints(
            StoreMode::Single,
            &["redis://u:secret@h1:7000/2", "redis://h2"],
            "",
        )
        .unwrap();
        assert_eq!(single.len(), 2);
        assert_eq!(single[0].0, "h1:7000");
        assert_eq!(single[0].1.password.as_deref(), Some("secret"));
        assert_eq!(single[0].1.database, 2);
        assert_eq!(single[1].0, "h2:6379");

        let cluster = endpoints(
            StoreMode::Cluster,
            &["redis://u:p@n1:7000?addr=n2:7001&addr=n3:7002"],
            "",
        )
        .unwrap();
        let ServerConfig::Cluster(config) = &cluster[0].1.server else {
            panic!("not a cluster")
        };
        assert_eq!(
            config.nodes,
            [
                ("n1".to_string(), 7000),
                ("n2".to_string(), 7001),
                ("n3".to_string(), 7002)
            ]
        );

        let sentinel = endpoints(
            StoreMode::Failover,
            &["redis://s1:26379", "redis://s2:26379"],
            "m",
        )
        .unwrap();
        let ServerConfig::Sentinel(config) = &sentinel[0].1.server else {
            panic!("not sentinel")
        };
        assert_eq!(config.service_name, "m");
        assert_eq!(config.instances.len(), 2);

        let err = endpoints(StoreMode::Single, &["http://u:secret@h"], "").unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
        assert!(endpoints(StoreMode::Single, &["redis://h/notanumber"], "").is_err());
    }
}
