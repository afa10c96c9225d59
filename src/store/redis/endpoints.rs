//! Where the Redis servers are: the configured URLs turned into one `rustis` configuration per
//! [`Node`](super::node::Node), each with a label free of credentials for logs and messages,
//! and, for `rediss://` URLs, the TLS configuration (`EA_REDIS_TLS_*`) they connect with.

use std::{path::Path, sync::Arc};

use rustis::client::{ClusterConfig, Config, SentinelConfig, ServerConfig, TlsConfig};
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
};

use crate::config::{RedisTls, StoreConfig, StoreMode};

/// Why the store configuration cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("EA_REDIS_URLS: {0}")]
pub struct EndpointError(String);

/// The endpoints of a configuration, each with a label free of credentials, and the positions
/// (see [`endpoints`]).
pub(crate) type Endpoints = (Vec<(String, Config)>, Vec<Vec<usize>>);

/// The endpoints of a configuration, each with a label free of credentials, and which of them
/// hold a key by its position: every endpoint in one position, except in sharding mode, where
/// each URL is one Redlock member of several servers (`redis://host:port?addr=h2:p2&addr=h3:p3`)
/// and position `p` holds the `p`-th server of every member.
pub(crate) fn endpoints(config: &StoreConfig) -> Result<Endpoints, EndpointError> {
    let endpoints = configs(config)?;
    if config.mode != StoreMode::Sharding {
        let all = (0..endpoints.len()).collect();
        return Ok((endpoints, vec![all]));
    }
    let urls = config.urls.len();
    let positions = endpoints.len() / urls;
    // `configs` lists each member's servers in turn; every member has as many.
    let shards = (0..positions)
        .map(|p| (0..urls).map(|m| m * positions + p).collect())
        .collect();
    Ok((endpoints, shards))
}

/// One `rustis` configuration per endpoint, with its label.
fn configs(config: &StoreConfig) -> Result<Vec<(String, Config)>, EndpointError> {
    let urls: Vec<url::Url> = config
        .urls
        .iter()
        .map(|raw| {
            let url = url::Url::parse(raw)
                .map_err(|err| EndpointError(format!("{:?} is not a URL: {err}", redact(raw))))?;
            match url.scheme() {
                "redis" | "rediss" => Ok(url),
                other => Err(EndpointError(format!(
                    "{:?}: scheme {other:?} is not supported; use redis:// (or rediss:// for TLS)",
                    redact(raw)
                ))),
            }
        })
        .collect::<Result<_, _>>()?;
    // The configuration refuses a mix of rediss:// and redis:// URLs.
    let tls = match urls.first() {
        Some(url) if url.scheme() == "rediss" => Some(tls_config(&config.tls)?),
        _ => None,
    };
    let host_port = |url: &url::Url| -> Result<(String, u16), EndpointError> {
        let host = url
            .host_str()
            .ok_or_else(|| EndpointError(format!("{:?} has no host", redact(url.as_str()))))?;
        Ok((host.to_owned(), url.port().unwrap_or(6379)))
    };
    let credentials = |url: &url::Url, config: &mut Config| -> Result<(), EndpointError> {
        config.tls_config.clone_from(&tls);
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
    let standalone = |url: &url::Url, (host, port): (String, u16)| {
        let mut endpoint = Config::default();
        endpoint.server = ServerConfig::Standalone {
            host: host.clone(),
            port,
        };
        credentials(url, &mut endpoint)?;
        Ok((format!("{host}:{port}"), endpoint))
    };
    match config.mode {
        StoreMode::Single => urls
            .iter()
            .map(|url| standalone(url, host_port(url)?))
            .collect(),
        StoreMode::Sharding => {
            let mut endpoints = Vec::new();
            let mut per_member = None;
            for url in &urls {
                let mut servers = vec![host_port(url)?];
                servers.extend(addrs(url)?);
                if *per_member.get_or_insert(servers.len()) != servers.len() {
                    return Err(EndpointError(format!(
                        "sharding: {:?} has {} servers, the first member {}; every member \
                         needs as many (one per position)",
                        redact(url.as_str()),
                        servers.len(),
                        per_member.unwrap_or_default()
                    )));
                }
                for server in servers {
                    endpoints.push(standalone(url, server)?);
                }
            }
            Ok(endpoints)
        }
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
                nodes.extend(addrs(url)?);
            }
            let mut cluster = ClusterConfig::default();
            cluster.nodes = nodes;
            let mut endpoint = Config::default();
            credentials(first, &mut endpoint)?;
            endpoint.database = 0;
            endpoint.server = ServerConfig::Cluster(cluster);
            Ok(vec![("cluster".to_owned(), endpoint)])
        }
        StoreMode::Memory => Err(EndpointError(format!(
            "EA_REDIS_MODE={} is not a Redis mode this agent serves",
            config.mode.as_str()
        ))),
    }
}

/// The TLS configuration of `rediss://` connections: servers verified against the CA file, or
/// the public web roots without one; the client certificate, if one is given. Read once, at
/// start-up (reconnections use the same).
fn tls_config(files: &RedisTls) -> Result<TlsConfig, EndpointError> {
    let error = |setting: &str, path: &Path, reason: &dyn std::fmt::Display| {
        EndpointError(format!("{setting}={}: {reason}", path.display()))
    };
    let certificates = |setting: &str, path: &Path| {
        let certificates = CertificateDer::pem_file_iter(path)
            .map_err(|err| error(setting, path, &err))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| error(setting, path, &err))?;
        if certificates.is_empty() {
            return Err(error(setting, path, &"no PEM certificate in it"));
        }
        Ok(certificates)
    };
    let roots = match &files.ca {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for certificate in certificates("EA_REDIS_TLS_CA_FILE", path)? {
                roots
                    .add(certificate)
                    .map_err(|err| error("EA_REDIS_TLS_CA_FILE", path, &err))?;
            }
            roots
        }
        None => RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    };
    let builder = ClientConfig::builder_with_provider(crate::transport::crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|err| EndpointError(format!("TLS: {err}")))?
        .with_root_certificates(roots);
    let config = match &files.client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = certificates("EA_REDIS_TLS_CERT_FILE", cert)?;
            let private = PrivateKeyDer::from_pem_file(key)
                .map_err(|err| error("EA_REDIS_TLS_KEY_FILE", key, &err))?;
            builder
                .with_client_auth_cert(chain, private)
                .map_err(|err| error("EA_REDIS_TLS_KEY_FILE", key, &err))?
        }
    };
    Ok(TlsConfig::new(Arc::new(config)))
}

/// The servers a URL's `addr=host:port` parameters name (Cluster, sharding).
fn addrs(url: &url::Url) -> Result<Vec<(String, u16)>, EndpointError> {
    url.query_pairs()
        .filter(|(name, _)| name == "addr")
        .map(|(_, value)| {
            let (host, port) = value
                .rsplit_once(':')
                .ok_or_else(|| EndpointError(format!("addr={value:?} is not host:port")))?;
            let port = port
                .parse()
                .map_err(|_| EndpointError(format!("addr={value:?}: bad port")))?;
            Ok((host.to_owned(), port))
        })
        .collect()
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
            tls: RedisTls::default(),
        }
    }

    #[test]
    fn endpoints_follow_the_go_service_url_formats() {
        let endpoints = |mode, urls: &[&str], master: &str| {
            super::endpoints(&store_config(mode, urls, master)).map(|(endpoints, _)| endpoints)
        };
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

        let (sharded, shards) = super::endpoints(&store_config(
            StoreMode::Sharding,
            &[
                "redis://u:secret@a1:1?addr=a2:2",
                "redis://u:secret@b1:1?addr=b2:2",
                "redis://u:secret@c1:1?addr=c2:2",
            ],
            "",
        ))
        .unwrap();
        let labels: Vec<&str> = sharded.iter().map(|(label, _)| label.as_str()).collect();
        assert_eq!(labels, ["a1:1", "a2:2", "b1:1", "b2:2", "c1:1", "c2:2"]);
        assert_eq!(
            shards,
            [vec![0, 2, 4], vec![1, 3, 5]],
            "a position per server of a member"
        );
        assert_eq!(sharded[3].1.password.as_deref(), Some("secret"));
        let uneven = super::endpoints(&store_config(
            StoreMode::Sharding,
            &["redis://a1:1?addr=a2:2", "redis://b1:1"],
            "",
        ))
        .unwrap_err();
        assert!(uneven.to_string().contains("every member"), "{uneven}");

        // TLS for rediss:// URLs only, in every mode.
        for (mode, master) in [
            (StoreMode::Single, ""),
            (StoreMode::Failover, "m"),
            (StoreMode::Cluster, ""),
        ] {
            let secure = endpoints(mode, &["rediss://h1:6380"], master).unwrap();
            assert!(secure[0].1.tls_config.is_some(), "{mode:?}");
            let plain = endpoints(mode, &["redis://h1:6379"], master).unwrap();
            assert!(plain[0].1.tls_config.is_none(), "{mode:?}");
        }

        let err = endpoints(StoreMode::Single, &["http://u:secret@h"], "").unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
        assert!(endpoints(StoreMode::Single, &["redis://h/notanumber"], "").is_err());
    }
}
