//! Outgoing HTTP from guests, checked by address as well as by name.
//!
//! `allowed_outbound_hosts` names `scheme://host:port`; a request to an allowed name is
//! then resolved by the host itself, and refused if **any** address the lookup returns
//! is internal (loopback, private, link-local such as the cloud metadata service at
//! 169.254.169.254, unspecified, multicast...) unless the allow-list names that very
//! address literally. The connection goes to an address that was checked, never to a
//! second lookup's answer, so a name that rebinds to `127.0.0.1` gets nowhere. Each
//! function has a cap on the outbound requests it has open at once.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Poll, ready};
use std::time::Duration;

use http_body_util::BodyExt as _;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody};

/// Outbound requests a function may have open at once, by default.
pub const DEFAULT_MAX_OUTBOUND: usize = 16;

/// How long a lookup or a connection may take when the guest sets no timeout.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether a guest may reach `ip` only when the allow-list names it literally.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_internal_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_internal_v4(v4),
            None => is_internal_v6(v6),
        },
    }
}

fn is_internal_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || a == 0 // "this network"
        || (a == 100 && (64..128).contains(&b)) // shared address space (carrier NAT)
        || (a == 192 && b == 0 && ip.octets()[2] == 0) // IETF protocol assignments
        || (a == 192 && b == 0 && ip.octets()[2] == 2) // documentation
        || (a == 198 && b == 51 && ip.octets()[2] == 100) // documentation
        || (a == 203 && b == 0 && ip.octets()[2] == 113) // documentation
        || (a == 192 && b == 88 && ip.octets()[2] == 99) // 6to4 relay anycast
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
        || a >= 240 // reserved
}

fn is_internal_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || (first & 0xfe00) == 0xfc00 // unique local
        || (first & 0xffc0) == 0xfe80 // link-local
        || (first & 0xffc0) == 0xfec0 // site-local (deprecated)
        // IPv4-compatible (::a.b.c.d), NAT64 (64:ff9b::/96) and 6to4 (2002::/16)
        // addresses embed an IPv4 address: judge that one.
        || (ip.segments()[..6] == [0; 6])
        || (ip.segments()[..6] == [0, 0, 0, 0, 0xffff, 0]) // IPv4-translated
        || (ip.segments()[..3] == [0x64, 0xff9b, 1]) // local-use NAT64
        || (ip.segments()[..2] == [0x2001, 0]) // Teredo (hides an IPv4 address)
        || (ip.segments()[..4] == [0x100, 0, 0, 0]) // discard-only
        || (ip.segments()[..6] == [0x64, 0xff9b, 0, 0, 0, 0]
            && is_internal_v4(embedded_v4(ip, 12)))
        || (first == 0x2002 && is_internal_v4(embedded_v4(ip, 2)))
}

fn embedded_v4(ip: Ipv6Addr, at: usize) -> Ipv4Addr {
    let o = ip.octets();
    Ipv4Addr::new(o[at], o[at + 1], o[at + 2], o[at + 3])
}

/// The addresses a lookup returned, checked: all of them, or the request is refused.
/// `literal` is the address the matching allow-list entry names, if it names one.
pub fn check_addresses(addresses: &[SocketAddr], literal: Option<IpAddr>) -> Result<(), IpAddr> {
    match addresses
        .iter()
        .map(SocketAddr::ip)
        .find(|ip| is_internal(*ip) && Some(*ip) != literal)
    {
        Some(refused) => Err(refused),
        None => Ok(()),
    }
}

/// What the send of one outgoing request returns to wasi:http.
pub type Sent = Result<
    (
        http::Response<WasiBody>,
        Box<dyn Future<Output = Result<(), Error>> + Send>,
    ),
    Error,
>;

/// Sends `request` (already allowed by name) to a checked address of its host.
/// `permit` is the function's outbound slot, held until the response body is done.
pub async fn send(
    mut request: http::Request<WasiBody>,
    options: Option<RequestOptions>,
    literal: Option<IpAddr>,
    permit: OwnedSemaphorePermit,
) -> Sent {
    let uri = request.uri().clone();
    let https = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
    let host = uri.host().ok_or(Error::HttpRequestUriInvalid)?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let connect_timeout = options
        .and_then(|o| o.connect_timeout)
        .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    let first_byte_timeout = options
        .and_then(|o| o.first_byte_timeout)
        .unwrap_or(DEFAULT_CONNECT_TIMEOUT);

    let addresses: Vec<SocketAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => {
            match tokio::time::timeout(
                connect_timeout,
                tokio::net::lookup_host((host.as_str(), port)),
            )
            .await
            {
                Err(_) => return Err(Error::DnsTimeout),
                Ok(Err(error)) => {
                    return Err(Error::DnsError {
                        rcode: Some(error.to_string()),
                        info_code: None,
                    });
                }
                Ok(Ok(found)) => found.collect(),
            }
        }
    };
    if addresses.is_empty() {
        return Err(Error::DestinationNotFound);
    }
    if let Err(refused) = check_addresses(&addresses, literal) {
        tracing::warn!(
            "refused outbound request to {uri}: `{host}` resolves to the internal address {refused}, which `allowed_outbound_hosts` does not name"
        );
        return Err(Error::DestinationIpProhibited);
    }
    let stream = tokio::time::timeout(connect_timeout, connect(&addresses))
        .await
        .map_err(|_| Error::ConnectionTimeout)?
        .map_err(Error::Connect)?;
    let stream: Box<dyn Stream> = if https {
        let name = match host.parse::<IpAddr>() {
            Ok(ip) => rustls::pki_types::ServerName::from(ip),
            Err(_) => rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(Error::InvalidDnsNameError)?,
        };
        let tls = tokio::time::timeout(connect_timeout, tls_connector().connect(name, stream))
            .await
            .map_err(|_| Error::ConnectionTimeout)?
            .map_err(Error::Tls)?;
        Box::new(tls)
    } else {
        Box::new(stream)
    };
    let (mut sender, connection) = tokio::time::timeout(
        connect_timeout,
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)),
    )
    .await
    .map_err(|_| Error::ConnectionTimeout)??;
    // The request line carries only the path: the authority is in the Host header.
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    *request.uri_mut() = http::Uri::try_from(path).map_err(|_| Error::HttpRequestUriInvalid)?;

    // Drive the connection while waiting for the response head.
    let mut connection = Some(connection);
    let mut response = std::pin::pin!(tokio::time::timeout(
        first_byte_timeout,
        sender.send_request(request)
    ));
    let response = std::future::poll_fn(|cx| {
        if let Poll::Ready(result) = response.as_mut().poll(cx) {
            return Poll::Ready(result);
        }
        if let Some(conn) = connection.as_mut() {
            let done = ready!(Pin::new(conn).poll(cx));
            connection = None;
            if let Err(error) = done {
                return Poll::Ready(Ok(Err(error)));
            }
            return response.as_mut().poll(cx);
        }
        Poll::Pending
    })
    .await
    .map_err(|_| Error::ConnectionReadTimeout)??;
    let io = async move {
        let _permit = permit; // Held while the connection (and the body) lasts.
        match connection {
            Some(connection) => connection.await.map_err(Error::from),
            None => Ok(()),
        }
    };
    Ok((
        response.map(|body| body.map_err(Error::from).boxed_unsync()),
        Box::new(io),
    ))
}

trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Stream for T {}

/// Connects to the first of `addresses` that answers.
async fn connect(addresses: &[SocketAddr]) -> std::io::Result<TcpStream> {
    let mut last = None;
    for address in addresses {
        match TcpStream::connect(address).await {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Err(error) => last = Some(error),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no address to connect to")))
}

/// TLS with the web PKI's roots, made once.
fn tls_connector() -> tokio_rustls::TlsConnector {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    let config = CONFIG.get_or_init(|| {
        let roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.into(),
        };
        Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap_or_else(|_| {
                rustls::ClientConfig::builder_with_protocol_versions(rustls::DEFAULT_VERSIONS)
            })
            .with_root_certificates(roots)
            .with_no_client_auth(),
        )
    });
    tokio_rustls::TlsConnector::from(Arc::clone(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_found_in_every_spelling() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::",
        ] {
            assert!(is_internal(ip.parse().expect(ip)), "{ip}");
        }
        for ip in [
            "1.1.1.1",
            "93.184.215.14",
            "2606:4700::1111",
            "64:ff9b::101:101",
        ] {
            assert!(!is_internal(ip.parse().expect(ip)), "{ip}");
        }
    }

    #[test]
    fn one_internal_address_refuses_the_whole_lookup_unless_named() {
        let public: SocketAddr = "1.1.1.1:80".parse().expect("addr");
        let local: SocketAddr = "127.0.0.1:80".parse().expect("addr");
        assert!(check_addresses(&[public], None).is_ok());
        assert_eq!(check_addresses(&[public, local], None), Err(local.ip()));
        assert!(check_addresses(&[local], Some(local.ip())).is_ok());
    }
}
