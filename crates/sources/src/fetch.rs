//! Fetching pages the way a polite and careful crawler does: robots.txt, a
//! pause between requests to one host, a size limit, a timeout, conditional
//! requests, and no way into the network ragd runs in.
//!
//! Server-side request forgery is refused at two points. Before each request
//! (and each redirect, which ragd follows itself, one hop at a time) a URL
//! whose host is an address literal is checked. A host name is checked when
//! it is resolved: the client's resolver ([`GuardedResolver`]) drops
//! addresses that are loopback, private, link-local, shared or otherwise not
//! public, so the connection can only go where the check allowed — a name
//! that resolves differently between a check and the connection (DNS
//! rebinding) gains nothing. Proxies from the environment are not used: a
//! proxy would resolve the name itself.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ragd_pipeline::Error;
use reqwest::header::{
    HeaderMap, CONTENT_LENGTH, CONTENT_TYPE, ETAG, IF_MODIFIED_SINCE, IF_NONE_MATCH, LAST_MODIFIED,
    LOCATION,
};
use url::{Host, Url};

use crate::SourcesConfig;

/// A fetched page.
#[derive(Debug, Clone)]
pub struct Page {
    /// Where it was found, after redirects.
    pub url: Url,
    /// The body.
    pub bytes: Vec<u8>,
    /// The declared content type.
    pub content_type: Option<String>,
    /// Validators for the next, conditional, request.
    pub etag: Option<String>,
    /// Same.
    pub last_modified: Option<String>,
}

/// What a request gave.
#[derive(Debug, Clone)]
pub enum Fetched {
    /// The page.
    Page(Page),
    /// 304: the validators still hold.
    NotModified,
    /// 404 or 410: there is no such page (any more).
    Gone(u16),
}

/// The validators of the version kept.
#[derive(Debug, Clone, Default)]
pub struct Validators {
    /// `ETag`.
    pub etag: Option<String>,
    /// `Last-Modified`.
    pub last_modified: Option<String>,
}

/// Whether `ip` is an address of the public internet (not loopback, private,
/// link-local — cloud metadata services live there —, shared, multicast,
/// unspecified or reserved).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b)) // shared (CGNAT)
                || (a == 198 && (b == 18 || b == 19)) // benchmarking
                || (a == 192 && b == 0 && v4.octets()[2] == 0) // IETF protocol assignments
                || a >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let seg = v6.segments();
            let embedded = |hi: u16, lo: u16| {
                IpAddr::V4(std::net::Ipv4Addr::new(
                    (hi >> 8) as u8,
                    hi as u8,
                    (lo >> 8) as u8,
                    lo as u8,
                ))
            };
            // Forms that carry an IPv4 address a gateway may reach: NAT64
            // (64:ff9b::/96, 64:ff9b:1::/48), IPv4-compatible (::a.b.c.d),
            // 6to4 (2002:AABB:CCDD::/48).
            if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0]
                || seg[..6] == [0, 0, 0, 0, 0, 0] && seg[6] != 0
            {
                return is_public(embedded(seg[6], seg[7]));
            }
            if seg[0] == 0x64 && seg[1] == 0xff9b && seg[2] == 1 {
                return false;
            }
            if seg[0] == 0x2002 {
                return is_public(embedded(seg[1], seg[2]));
            }
            let first = seg[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00 // unique local
                || (first & 0xffc0) == 0xfe80 // link-local
                || (first == 0x2001 && v6.segments()[1] == 0xdb8)) // documentation
        }
    }
}

/// Resolves host names, keeping only public addresses unless the host is
/// allowed to be private.
#[derive(Debug)]
struct GuardedResolver {
    allow: Arc<Vec<String>>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        let allowed = host_allowed(&self.allow, &host);
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let kept: Vec<SocketAddr> = addrs
                .iter()
                .copied()
                .filter(|a| allowed || is_public(a.ip()))
                .collect();
            if kept.is_empty() {
                let shown = addrs
                    .first()
                    .map(|a| a.ip().to_string())
                    .unwrap_or_default();
                return Err(format!(
                    "refused: {host} resolves to {shown}, an address inside this network (list the host in sources.allow_private_hosts to allow it)"
                )
                .into());
            }
            Ok(Box::new(kept.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

fn host_allowed(allow: &[String], host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    allow.iter().any(|a| {
        a == "*"
            || a.eq_ignore_ascii_case(bare)
            || a.trim_start_matches('[').trim_end_matches(']') == bare
    })
}

/// What robots.txt says for one host.
#[derive(Debug, Clone)]
enum Robots {
    /// No robots.txt (4xx): everything may be fetched.
    AllowAll,
    /// robots.txt could not be read (5xx, timeout): nothing may be, for now
    /// (RFC 9309, 2.3.1.4).
    Unreachable(String),
    /// Its rules for our user agent.
    Rules(Arc<texting_robots::Robot>),
}

/// The HTTP client and what it remembers between requests: when each host
/// may be asked again.
#[derive(Debug)]
pub struct Fetcher {
    client: reqwest::Client,
    allow: Arc<Vec<String>>,
    user_agent: String,
    max_bytes: usize,
    max_redirects: usize,
    interval: Duration,
    /// When each host (scheme, host, port) may next be asked.
    next: tokio::sync::Mutex<HashMap<String, Instant>>,
}

/// One sync's view of the web: robots.txt read once per host per sync.
#[derive(Debug)]
pub struct Session<'a> {
    fetcher: &'a Fetcher,
    robots: HashMap<String, Robots>,
}

fn origin(url: &Url) -> String {
    format!(
        "{}://{}:{}",
        url.scheme(),
        url.host_str().unwrap_or(""),
        url.port_or_known_default().unwrap_or(0)
    )
}

/// A request error with its causes (reqwest's own message says little).
fn describe(e: &reqwest::Error) -> String {
    let mut out = if e.is_timeout() {
        "timed out".to_string()
    } else {
        e.to_string()
    };
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        let s = c.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cause = c.source();
    }
    out
}

impl Fetcher {
    /// A client for `config`.
    pub fn new(config: &SourcesConfig) -> Result<Self, Error> {
        let allow = Arc::new(config.allow_private_hosts.clone());
        let timeout = Duration::from_secs_f64(config.timeout_s.max(0.001));
        let client = reqwest::Client::builder()
            .user_agent(config.user_agent.clone())
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(timeout)
            .connect_timeout(timeout)
            .dns_resolver(Arc::new(GuardedResolver {
                allow: Arc::clone(&allow),
            }))
            .build()
            .map_err(Error::internal)?;
        Ok(Fetcher {
            client,
            allow,
            user_agent: config.user_agent.clone(),
            max_bytes: config.max_bytes,
            max_redirects: config.max_redirects,
            interval: Duration::from_millis(config.per_host_interval_ms),
            next: tokio::sync::Mutex::new(HashMap::new()),
        })
    }

    /// A session for one sync.
    pub fn session(&self) -> Session<'_> {
        Session {
            fetcher: self,
            robots: HashMap::new(),
        }
    }

    /// Refuses a URL that is not http(s), or whose host is a literal address
    /// inside this network (names are checked when resolved).
    fn check(&self, url: &Url) -> Result<(), String> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("refused: {url} is not an http or https URL"));
        }
        let ip = match url.host() {
            Some(Host::Ipv4(ip)) => IpAddr::V4(ip),
            Some(Host::Ipv6(ip)) => IpAddr::V6(ip),
            Some(Host::Domain(_)) => return Ok(()),
            None => return Err(format!("refused: {url} has no host")),
        };
        if is_public(ip) || host_allowed(&self.allow, &ip.to_string()) {
            Ok(())
        } else {
            Err(format!(
                "refused: {ip} is an address inside this network (list it in sources.allow_private_hosts to allow it)"
            ))
        }
    }

    /// Waits until `url`'s host may be asked again (at least `delay` after
    /// the last request to it).
    async fn pace(&self, url: &Url, delay: Duration) {
        let wait = {
            let mut next = self.next.lock().await;
            let now = Instant::now();
            let at = next.get(&origin(url)).copied().unwrap_or(now).max(now);
            next.insert(origin(url), at + delay);
            at - now
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    /// One request, no redirects followed: the response with its body read
    /// (within the size limit) when it is a 2xx.
    async fn once(
        &self,
        url: &Url,
        validators: &Validators,
        delay: Duration,
    ) -> Result<(reqwest::StatusCode, HeaderMap, Vec<u8>), String> {
        self.check(url)?;
        self.pace(url, delay).await;
        let mut req = self.client.get(url.clone());
        if let Some(etag) = &validators.etag {
            req = req.header(IF_NONE_MATCH, etag);
        }
        if let Some(lm) = &validators.last_modified {
            req = req.header(IF_MODIFIED_SINCE, lm);
        }
        let mut resp = req.send().await.map_err(|e| describe(&e))?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let mut body = Vec::new();
        if status.is_success() {
            let declared = headers
                .get(CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<usize>().ok());
            if declared.is_some_and(|n| n > self.max_bytes) {
                return Err(format!(
                    "larger than sources.max_bytes ({} bytes)",
                    self.max_bytes
                ));
            }
            while let Some(chunk) = resp.chunk().await.map_err(|e| describe(&e))? {
                if body.len() + chunk.len() > self.max_bytes {
                    return Err(format!(
                        "larger than sources.max_bytes ({} bytes)",
                        self.max_bytes
                    ));
                }
                body.extend_from_slice(&chunk);
            }
        }
        Ok((status, headers, body))
    }
}

fn header(headers: &HeaderMap, name: reqwest::header::HeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

impl Session<'_> {
    /// What robots.txt of `url`'s host says, read once per session.
    async fn robots(&mut self, url: &Url) -> Robots {
        let key = origin(url);
        if let Some(r) = self.robots.get(&key) {
            return r.clone();
        }
        let f = self.fetcher;
        let robots = match url.join("/robots.txt") {
            Err(e) => Robots::Unreachable(e.to_string()),
            Ok(at) => match f.once(&at, &Validators::default(), f.interval).await {
                Ok((s, _, body)) if s.is_success() => {
                    match texting_robots::Robot::new(&f.user_agent, &body) {
                        Ok(r) => Robots::Rules(Arc::new(r)),
                        // Unparseable rules say nothing we can follow.
                        Err(_) => Robots::AllowAll,
                    }
                }
                Ok((s, _, _)) if s.is_client_error() || s.is_redirection() => Robots::AllowAll,
                Ok((s, _, _)) => Robots::Unreachable(format!("robots.txt answered {s}")),
                Err(e) => Robots::Unreachable(format!("robots.txt: {e}")),
            },
        };
        self.robots.insert(key, robots.clone());
        robots
    }

    /// GETs `url` (conditionally, with `validators`), following redirects
    /// one checked hop at a time.
    pub async fn get(&mut self, url: &Url, validators: &Validators) -> Result<Fetched, String> {
        let mut at = url.clone();
        for _ in 0..=self.fetcher.max_redirects {
            self.fetcher.check(&at)?;
            let delay = match self.robots(&at).await {
                Robots::AllowAll => self.fetcher.interval,
                // Refused by the address guard: say that, not "robots.txt".
                Robots::Unreachable(why) if why.contains("refused: ") => {
                    return Err(why[why.find("refused: ").unwrap_or(0)..].to_string())
                }
                Robots::Unreachable(why) => {
                    return Err(format!("not fetched: {why} (robots.txt must be readable)"))
                }
                Robots::Rules(r) => {
                    if !r.allowed(at.as_str()) {
                        return Err(format!("disallowed by robots.txt: {at}"));
                    }
                    let crawl = r.delay.map(|d| Duration::from_secs_f32(d.clamp(0.0, 60.0)));
                    crawl.map_or(self.fetcher.interval, |d| d.max(self.fetcher.interval))
                }
            };
            let (status, headers, bytes) = self.fetcher.once(&at, validators, delay).await?;
            if status.is_redirection() && status != reqwest::StatusCode::NOT_MODIFIED {
                let Some(location) = header(&headers, LOCATION) else {
                    return Err(format!("{status} without a Location"));
                };
                at = at
                    .join(&location)
                    .map_err(|e| format!("redirect to {location:?}: {e}"))?;
                continue;
            }
            return match status.as_u16() {
                304 => Ok(Fetched::NotModified),
                404 | 410 => Ok(Fetched::Gone(status.as_u16())),
                _ if status.is_success() => Ok(Fetched::Page(Page {
                    url: at,
                    bytes,
                    content_type: header(&headers, CONTENT_TYPE),
                    etag: header(&headers, ETAG),
                    last_modified: header(&headers, LAST_MODIFIED),
                })),
                _ => Err(format!("HTTP {status}")),
            };
        }
        Err(format!(
            "more than {} redirects",
            self.fetcher.max_redirects
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_inside_the_network_are_not_public() {
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "224.0.0.1",
        ] {
            assert!(!is_public(a.parse().unwrap()), "{a}");
        }
        for a in [
            "93.184.216.34",
            "1.1.1.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(is_public(a.parse().unwrap()), "{a}");
        }
    }

    #[test]
    fn literal_addresses_are_checked_before_any_request() {
        let f = Fetcher::new(&SourcesConfig {
            allow_private_hosts: vec!["127.0.0.1".into()],
            ..SourcesConfig::default()
        })
        .unwrap();
        assert!(f
            .check(&Url::parse("http://127.0.0.1:8080/x").unwrap())
            .is_ok());
        let e = f
            .check(&Url::parse("http://169.254.169.254/latest").unwrap())
            .unwrap_err();
        assert!(e.contains("inside this network"), "{e}");
        assert!(f.check(&Url::parse("http://[::1]/").unwrap()).is_err());
        assert!(f.check(&Url::parse("file:///etc/passwd").unwrap()).is_err());
        assert!(f.check(&Url::parse("http://example.com/").unwrap()).is_ok());
    }
}
