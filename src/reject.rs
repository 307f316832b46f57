//! Every reason a request or a connection is refused, in one table each.
//!
//! A row fixes everything about a reason: its HTTP status, its stable
//! snake_case label (the `reason` of the metric), the request outcome it
//! counts under, whether it adds to the client's penalty score and whether
//! the connection it came on is closed. The enums, their `ALL` lists and
//! every accessor are generated from the rows, so a reason cannot be
//! declared without all of them and metric indices (`index()`) cover every
//! reason by construction.

use http::StatusCode;

use crate::dns::QueryError;

/// How a request ended, the `outcome` label of `doh_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Answered,
    Rejected,
    RateLimited,
    Banned,
    Overloaded,
    /// An answer the client never took: its connection closed before the
    /// answer could be written (a flow-control window never opened).
    Undelivered,
}

impl Outcome {
    pub const ALL: [Outcome; 6] = [
        Outcome::Answered,
        Outcome::Rejected,
        Outcome::RateLimited,
        Outcome::Banned,
        Outcome::Overloaded,
        Outcome::Undelivered,
    ];

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn label(self) -> &'static str {
        match self {
            Outcome::Answered => "answered",
            Outcome::Rejected => "rejected",
            Outcome::RateLimited => "rate_limited",
            Outcome::Banned => "banned",
            Outcome::Overloaded => "overloaded",
            Outcome::Undelivered => "undelivered",
        }
    }
}

/// The protocol a request came in on, the `transport` label of
/// `doh_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// HTTP/1.1, over TLS or plain.
    H1,
    /// HTTP/2, over TLS or h2c.
    H2,
    /// HTTP/3 over QUIC.
    H3,
    /// DNS over TLS.
    Dot,
    /// DNS over QUIC.
    Doq,
}

impl Transport {
    pub const ALL: [Transport; 5] = [
        Transport::H1,
        Transport::H2,
        Transport::H3,
        Transport::Dot,
        Transport::Doq,
    ];

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn label(self) -> &'static str {
        match self {
            Transport::H1 => "h1",
            Transport::H2 => "h2",
            Transport::H3 => "h3",
            Transport::Dot => "dot",
            Transport::Doq => "doq",
        }
    }
}

/// What the penalty box needs to know of any refusal.
pub trait Refusal: Copy {
    fn label(&self) -> &'static str;
    fn scored(&self) -> bool;
}

/// What a row of a refusal table says.
struct Row {
    status: u16,
    /// What a DNS-message transport (DNS over TLS) answers: FORMERR for
    /// what does not parse, REFUSED for policy, SERVFAIL when no answer
    /// can be had; 0 (read as SERVFAIL) where the row never reaches one.
    rcode: u8,
    label: &'static str,
    outcome: Outcome,
    scored: bool,
    closes: bool,
    /// `Retry-After` seconds, for refusals a client may try again after
    /// (the budget's own wait, when it knows one, takes its place).
    retry_after: Option<u64>,
    /// `Allow`, for a method refused.
    allow: Option<&'static str>,
    /// Over HTTP/1.1, the body is read and thrown away (up to a bound)
    /// before the response goes out, so that the client sees it.
    linger: bool,
}

macro_rules! table {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[doc = $doc:literal])* $variant:ident => ($status:literal, $label:literal, $outcome:ident, scored: $scored:literal, closes: $closes:literal $(, rcode: $rcode:ident)? $(, retry_after: $retry:literal)? $(, allow: $allow:literal)? $(, linger: $linger:literal)?), )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[doc = $doc])* $variant, )*
        }

        impl $name {
            /// Every variant, in declaration order: `ALL[r.index()] == r`.
            pub const ALL: &'static [$name] = &[$($name::$variant),*];

            /// A dense index for per-reason metric handles.
            pub fn index(self) -> usize {
                self as usize
            }

            fn row(self) -> Row {
                match self {
                    $( $name::$variant => Row {
                        status: $status,
                        rcode: 0 $(+ crate::dns::$rcode)?,
                        label: $label,
                        outcome: Outcome::$outcome,
                        scored: $scored,
                        closes: $closes,
                        retry_after: None $(.or(Some($retry)))?,
                        allow: None $(.or(Some($allow)))?,
                        linger: false $(|| $linger)?,
                    }, )*
                }
            }

            /// The stable label used in metrics and logs.
            pub fn label(self) -> &'static str {
                self.row().label
            }

            /// Whether this adds to the client's penalty score.
            pub fn scored(self) -> bool {
                self.row().scored
            }

            /// Whether the connection this came on is closed.
            pub fn closes(self) -> bool {
                self.row().closes
            }

            /// `Retry-After` seconds, when the row names them.
            pub fn retry_after(self) -> Option<u64> {
                self.row().retry_after
            }

            /// The `Allow` header, when the row names one.
            pub fn allow(self) -> Option<&'static str> {
                self.row().allow
            }

            /// Whether HTTP/1.1 reads the body away before answering.
            pub fn lingers(self) -> bool {
                self.row().linger
            }

            /// The DNS rcode a DNS-message transport answers with: the
            /// table's `rcode` column, SERVFAIL where the row has none.
            pub fn rcode(self) -> u8 {
                match self.row().rcode {
                    0 => crate::dns::RCODE_SERVFAIL,
                    rcode => rcode,
                }
            }
        }

        impl Refusal for $name {
            fn label(&self) -> &'static str {
                self.row().label
            }
            fn scored(&self) -> bool {
                self.row().scored
            }
        }
    };
}

table! {
    /// Why a request was refused before it could be answered.
    pub enum Reject {
        /// The path is not the DoH path.
        NotFound => (404, "not_found", Rejected, scored: true, closes: false),
        /// A method other than GET or POST.
        Method => (405, "method_not_allowed", Rejected, scored: true, closes: false, allow: "GET, POST"),
        /// The request target is longer than `--max-uri`.
        UriTooLong => (414, "uri_too_long", Rejected, scored: true, closes: false),
        /// Request headers over 16 KiB in all.
        HeadersTooLarge => (431, "headers_too_large", Rejected, scored: true, closes: false),
        /// POST body longer than `--max-body` (or a Content-Length saying so).
        BodyTooLarge => (413, "body_too_large", Rejected, scored: true, closes: false, linger: true),
        /// The client took too long to send its POST body.
        BodyTimeout => (408, "body_timeout", Rejected, scored: true, closes: false),
        /// POST with a Content-Type other than `application/dns-message`.
        MediaType => (415, "unsupported_media_type", Rejected, scored: true, closes: false),
        /// POST with a media type of an obsolete DoH draft
        /// (`application/dns-udpwireformat`, `message/dns`).
        ObsoleteMediaType => (415, "obsolete_media_type", Rejected, scored: true, closes: false),
        /// Parameters of obsolete DoH drafts: `ct`, `body`, `content-type`,
        /// `random_padding`.
        ObsoleteDraft => (400, "obsolete_draft", Rejected, scored: true, closes: false),
        /// The JSON API (`name`, `type` parameters), which is not RFC 8484.
        JsonApi => (400, "json_api", Rejected, scored: true, closes: false),
        /// GET without a `dns` parameter, or with an empty one.
        MissingDns => (400, "missing_dns", Rejected, scored: true, closes: false),
        /// More than one `dns` parameter.
        DuplicateDns => (400, "duplicate_dns", Rejected, scored: true, closes: false),
        /// `dns` is not valid base64url.
        BadBase64 => (400, "bad_base64", Rejected, scored: true, closes: false),
        /// POST with an empty body.
        EmptyBody => (400, "empty_body", Rejected, scored: true, closes: false),
        /// The DNS message is shorter than a header and a question.
        DnsTooShort => (400, "dns_too_short", Rejected, scored: true, closes: false, rcode: RCODE_FORMERR),
        /// Bytes after the last record.
        DnsTrailingBytes => (400, "dns_trailing_bytes", Rejected, scored: true, closes: false, rcode: RCODE_FORMERR),
        /// QR set: a response, not a query.
        DnsQrSet => (400, "dns_qr_set", Rejected, scored: true, closes: false, rcode: RCODE_FORMERR),
        /// An opcode other than QUERY.
        DnsOpcode => (400, "dns_opcode", Rejected, scored: true, closes: false, rcode: RCODE_FORMERR),
        /// QDCOUNT is not 1.
        DnsQdcount => (400, "dns_qdcount", Rejected, scored: true, closes: false, rcode: RCODE_FORMERR),
        /// Records in the answer, authority or additional section (but OPT).
        DnsRecords => (400, "dns_records", Rejected, scored: true, closes: false, rcode: RCODE_FORMERR),
        /// An invalid question name.
        DnsBadName => (400, "dns_bad_name", Rejected, scored: true, closes: false, rcode: RCODE_FORMERR),
        /// Anything else that does not decode.
        DnsMalformed => (400, "dns_malformed", Rejected, scored: true, closes: false, rcode: RCODE_FORMERR),
        /// The client is over its budget.
        RateLimited => (429, "rate_limited", RateLimited, scored: true, closes: false, rcode: RCODE_REFUSED, retry_after: 1),
        /// The client is banned (seen behind a trusted proxy, or banned while
        /// its connection was open).
        Banned => (403, "banned", Banned, scored: false, closes: true, rcode: RCODE_REFUSED),
        /// The upstream budget is spent and nothing, not even stale, is cached.
        UpstreamBudget => (503, "upstream_budget", Overloaded, scored: false, closes: false, rcode: RCODE_SERVFAIL, retry_after: 1),
        /// An Oblivious DoH query under a key that is not (or no longer)
        /// ours: the client is to fetch the configs again. Scored like any
        /// refusal: an honest client meets it once after a rotation (the
        /// previous key is still taken for a whole period), a flood of
        /// them is somebody's HPKE-free way to make the target work.
        OdohUnknownKey => (401, "odoh_unknown_key", Rejected, scored: true, closes: false),
        /// A body that is not a sealed Oblivious DoH query, or does not open.
        OdohMalformed => (400, "odoh_malformed", Rejected, scored: true, closes: false),
    }
}

impl Reject {
    /// The HTTP status this reason is answered with.
    pub fn status(self) -> StatusCode {
        StatusCode::from_u16(self.row().status).unwrap_or(StatusCode::BAD_REQUEST)
    }

    /// The request outcome this reason counts under.
    pub fn outcome(self) -> Outcome {
        self.row().outcome
    }
}

impl From<QueryError> for Reject {
    fn from(e: QueryError) -> Reject {
        match e {
            QueryError::TooShort => Reject::DnsTooShort,
            QueryError::TrailingBytes => Reject::DnsTrailingBytes,
            QueryError::NotAQuery => Reject::DnsQrSet,
            QueryError::Opcode => Reject::DnsOpcode,
            QueryError::QuestionCount => Reject::DnsQdcount,
            QueryError::UnexpectedRecords => Reject::DnsRecords,
            QueryError::BadName => Reject::DnsBadName,
            QueryError::Malformed => Reject::DnsMalformed,
        }
    }
}

table! {
    /// Why a connection was closed at accept or before its first request.
    /// The status column is unused (0): these never reach HTTP.
    pub enum ConnReject {
        /// The address or its prefix is banned.
        Banned => (0, "banned", Banned, scored: false, closes: true),
        /// Inside a static `--deny` range.
        Denied => (0, "denied", Rejected, scored: false, closes: true),
        /// The address holds `--max-conns-per-ip` connections.
        PerIp => (0, "per_ip", Rejected, scored: false, closes: true),
        /// The address's prefix holds 8 × `--max-conns-per-ip`.
        PerPrefix => (0, "per_prefix", Rejected, scored: false, closes: true),
        /// The address's wider network (IPv4 /16, IPv6 /48) holds its share
        /// of `--max-conns`.
        PerNetwork => (0, "per_network", Rejected, scored: false, closes: true),
        /// `--max-conns` are open and none is idle enough to give way.
        Global => (0, "global", Overloaded, scored: false, closes: true),
        /// More new connections per second than `--per-ip-conn-rate` or
        /// `--per-prefix-conn-rate`.
        ConnRate => (0, "conn_rate", Rejected, scored: true, closes: true),
        /// The TLS handshake did not complete within `--handshake-timeout`.
        HandshakeTimeout => (0, "handshake_timeout", Rejected, scored: true, closes: true),
        /// The TLS handshake failed (garbage, an alert, no common protocol).
        HandshakeFailed => (0, "handshake_failed", Rejected, scored: true, closes: true),
        /// No complete first request within `--handshake-timeout` of accept.
        FirstRequestTimeout => (0, "first_request_timeout", Rejected, scored: true, closes: true),
        /// A trusted proxy sent no valid PROXY header in time.
        ProxyHeader => (0, "proxy_header", Rejected, scored: false, closes: true),
        /// The client left its answers unread for `--write-timeout`
        /// (pipelined queries it never reads, a flow-control window it
        /// never opens).
        WriteTimeout => (0, "write_timeout", Rejected, scored: true, closes: true),
    }
}

impl ConnReject {
    /// Whether this is a mitigation that `--dry-run` only counts. Static
    /// denials and protocol failures are always enforced.
    pub fn is_mitigation(self) -> bool {
        matches!(
            self,
            ConnReject::Banned
                | ConnReject::PerIp
                | ConnReject::PerPrefix
                | ConnReject::PerNetwork
                | ConnReject::Global
                | ConnReject::ConnRate
        )
    }
}

table! {
    /// A connection-level protocol error the server detected (the
    /// `kind` of `doh_protocol_errors_total`). Every one scores.
    pub enum ProtocolError {
        /// An HTTP/1.1 request that does not parse.
        H1Parse => (0, "h1_parse", Rejected, scored: true, closes: true),
        /// An HTTP/2 protocol error: GOAWAY with PROTOCOL_ERROR,
        /// FRAME_SIZE_ERROR, COMPRESSION_ERROR or the like.
        H2Protocol => (0, "h2_protocol", Rejected, scored: true, closes: true),
        /// HTTP/2 GOAWAY with ENHANCE_YOUR_CALM (resets or errors beyond the limits).
        H2Calm => (0, "h2_enhance_your_calm", Rejected, scored: true, closes: true),
        /// A TLS alert or bad record after the handshake started.
        TlsAlert => (0, "tls_alert", Rejected, scored: true, closes: true),
        /// A DNS-over-TLS message that is not one valid query.
        DotMalformed => (0, "dot_malformed", Rejected, scored: true, closes: true),
        /// A QUIC or HTTP/3 connection closed for a protocol violation.
        H3Protocol => (0, "h3_protocol", Rejected, scored: true, closes: true),
        /// A DNS-over-QUIC stream that breaks RFC 9250: a length prefix
        /// that does not match, a message ID other than 0, a message that
        /// is not one valid query; the connection is closed with
        /// DOQ_PROTOCOL_ERROR.
        DoqProtocol => (0, "doq_protocol", Rejected, scored: true, closes: true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_has_the_rcode_a_dns_transport_answers_with() {
        use crate::dns::{RCODE_FORMERR, RCODE_REFUSED, RCODE_SERVFAIL};
        for &r in Reject::ALL {
            let want = match r {
                Reject::RateLimited | Reject::Banned => RCODE_REFUSED,
                Reject::UpstreamBudget => RCODE_SERVFAIL,
                _ if r.label().starts_with("dns_") => RCODE_FORMERR,
                // HTTP-only reasons never reach a DNS transport.
                _ => RCODE_SERVFAIL,
            };
            assert_eq!(r.rcode(), want, "{}", r.label());
        }
    }
    use std::collections::HashSet;

    fn check_labels(labels: Vec<&'static str>) {
        let n = labels.len();
        let set: HashSet<_> = labels.into_iter().collect();
        assert_eq!(set.len(), n, "labels are unique");
        for l in set {
            assert!(
                l.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{l}"
            );
        }
    }

    #[test]
    fn labels_are_unique_snake_case_and_indices_dense() {
        check_labels(Reject::ALL.iter().map(|r| r.label()).collect());
        check_labels(ConnReject::ALL.iter().map(|r| r.label()).collect());
        check_labels(ProtocolError::ALL.iter().map(|r| r.label()).collect());
        for (i, r) in Reject::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
        for (i, r) in ConnReject::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
        for (i, o) in Outcome::ALL.iter().enumerate() {
            assert_eq!(o.index(), i);
        }
        for (i, t) in Transport::ALL.iter().enumerate() {
            assert_eq!(t.index(), i);
        }
    }

    #[test]
    fn statuses_follow_the_spec_table() {
        assert_eq!(Reject::ObsoleteDraft.status(), 400);
        assert_eq!(Reject::JsonApi.status(), 400);
        assert_eq!(Reject::ObsoleteMediaType.status(), 415);
        assert_eq!(Reject::MediaType.status(), 415);
        assert_eq!(Reject::BodyTooLarge.status(), 413);
        assert_eq!(Reject::UriTooLong.status(), 414);
        assert_eq!(Reject::HeadersTooLarge.status(), 431);
        assert_eq!(Reject::Method.status(), 405);
        assert_eq!(Reject::NotFound.status(), 404);
        assert_eq!(Reject::RateLimited.status(), 429);
        assert_eq!(Reject::Banned.status(), 403);
        assert_eq!(Reject::UpstreamBudget.status(), 503);
        assert_eq!(Reject::from(QueryError::TrailingBytes).status(), 400);
        for r in Reject::ALL {
            assert!(r.status().as_u16() >= 400, "{r:?}");
        }
    }

    #[test]
    fn headers_come_from_the_rows() {
        for r in Reject::ALL {
            // Retry-After for 429 and 503, Allow for 405, nothing else.
            let retry = matches!(r.status().as_u16(), 429 | 503);
            assert_eq!(r.retry_after().is_some(), retry, "{r:?}");
            assert_eq!(r.allow().is_some(), r.status() == 405, "{r:?}");
            assert_eq!(r.lingers(), *r == Reject::BodyTooLarge, "{r:?}");
        }
        assert_eq!(Reject::Method.allow(), Some("GET, POST"));
    }

    #[test]
    fn junk_scores_and_our_own_overload_does_not() {
        assert!(Reject::NotFound.scored() && Reject::Method.scored());
        assert!(!Reject::UpstreamBudget.scored() && !Reject::Banned.scored());
        assert!(Reject::Banned.closes() && !Reject::RateLimited.closes());
        assert!(ConnReject::ConnRate.scored() && !ConnReject::Global.scored());
        assert!(!ConnReject::Denied.is_mitigation());
    }
}
