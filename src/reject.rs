//! Every reason a request is refused, in one place.
//!
//! Each reason maps to exactly one HTTP status, one stable snake_case label
//! (the `reason` of `doh_rejects_total`) and one request outcome. Adding a
//! reason means adding one variant and three match arms here, nothing else.

use http::StatusCode;

use crate::dns::QueryError;

/// Why a request was refused before it could be answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reject {
    /// The path is not the DoH path.
    NotFound,
    /// A method other than GET or POST.
    Method,
    /// The request target is longer than `--max-uri`.
    UriTooLong,
    /// Request headers over 16 KiB in all.
    HeadersTooLarge,
    /// POST body longer than `--max-body` (or a Content-Length saying so).
    BodyTooLarge,
    /// The client took too long to send its POST body.
    BodyTimeout,
    /// POST with a Content-Type other than `application/dns-message`.
    MediaType,
    /// POST with a media type of an obsolete DoH draft
    /// (`application/dns-udpwireformat`, `message/dns`).
    ObsoleteMediaType,
    /// Parameters of obsolete DoH drafts: `ct`, `body`, `content-type`,
    /// `random_padding`.
    ObsoleteDraft,
    /// The JSON API (`name`, `type` parameters), which is not RFC 8484.
    JsonApi,
    /// GET without a `dns` parameter, or with an empty one.
    MissingDns,
    /// More than one `dns` parameter.
    DuplicateDns,
    /// `dns` is not valid base64url.
    BadBase64,
    /// POST with an empty body.
    EmptyBody,
    /// The DNS message is not one valid query.
    Dns(QueryError),
    /// The client is over its budget.
    RateLimited,
    /// The client is banned (seen behind a trusted proxy, or banned while
    /// its connection was open).
    Banned,
    /// The upstream budget is spent and nothing, not even stale, is cached.
    UpstreamBudget,
}

/// How a request ended, the `outcome` label of `doh_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Answered,
    Rejected,
    RateLimited,
    Banned,
    Overloaded,
}

impl Outcome {
    pub const ALL: [Outcome; 5] = [
        Outcome::Answered,
        Outcome::Rejected,
        Outcome::RateLimited,
        Outcome::Banned,
        Outcome::Overloaded,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Outcome::Answered => "answered",
            Outcome::Rejected => "rejected",
            Outcome::RateLimited => "rate_limited",
            Outcome::Banned => "banned",
            Outcome::Overloaded => "overloaded",
        }
    }
}

impl Reject {
    /// Every reason, for pre-registering metrics.
    pub const ALL: [Reject; 25] = [
        Reject::NotFound,
        Reject::Method,
        Reject::UriTooLong,
        Reject::HeadersTooLarge,
        Reject::BodyTooLarge,
        Reject::BodyTimeout,
        Reject::MediaType,
        Reject::ObsoleteMediaType,
        Reject::ObsoleteDraft,
        Reject::JsonApi,
        Reject::MissingDns,
        Reject::DuplicateDns,
        Reject::BadBase64,
        Reject::EmptyBody,
        Reject::Dns(QueryError::TooShort),
        Reject::Dns(QueryError::TrailingBytes),
        Reject::Dns(QueryError::NotAQuery),
        Reject::Dns(QueryError::Opcode),
        Reject::Dns(QueryError::QuestionCount),
        Reject::Dns(QueryError::UnexpectedRecords),
        Reject::Dns(QueryError::BadName),
        Reject::Dns(QueryError::Malformed),
        Reject::RateLimited,
        Reject::Banned,
        Reject::UpstreamBudget,
    ];

    /// The HTTP status this reason is answered with.
    pub fn status(self) -> StatusCode {
        match self {
            Reject::NotFound => StatusCode::NOT_FOUND,
            Reject::Method => StatusCode::METHOD_NOT_ALLOWED,
            Reject::UriTooLong => StatusCode::URI_TOO_LONG,
            Reject::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Reject::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Reject::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Reject::MediaType | Reject::ObsoleteMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Reject::ObsoleteDraft
            | Reject::JsonApi
            | Reject::MissingDns
            | Reject::DuplicateDns
            | Reject::BadBase64
            | Reject::EmptyBody
            | Reject::Dns(_) => StatusCode::BAD_REQUEST,
            Reject::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Reject::Banned => StatusCode::FORBIDDEN,
            Reject::UpstreamBudget => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The stable label used for `doh_rejects_total{reason}` and in logs.
    pub fn label(self) -> &'static str {
        match self {
            Reject::NotFound => "not_found",
            Reject::Method => "method_not_allowed",
            Reject::UriTooLong => "uri_too_long",
            Reject::HeadersTooLarge => "headers_too_large",
            Reject::BodyTooLarge => "body_too_large",
            Reject::BodyTimeout => "body_timeout",
            Reject::MediaType => "unsupported_media_type",
            Reject::ObsoleteMediaType => "obsolete_media_type",
            Reject::ObsoleteDraft => "obsolete_draft",
            Reject::JsonApi => "json_api",
            Reject::MissingDns => "missing_dns",
            Reject::DuplicateDns => "duplicate_dns",
            Reject::BadBase64 => "bad_base64",
            Reject::EmptyBody => "empty_body",
            Reject::Dns(QueryError::TooShort) => "dns_too_short",
            Reject::Dns(QueryError::TrailingBytes) => "dns_trailing_bytes",
            Reject::Dns(QueryError::NotAQuery) => "dns_qr_set",
            Reject::Dns(QueryError::Opcode) => "dns_opcode",
            Reject::Dns(QueryError::QuestionCount) => "dns_qdcount",
            Reject::Dns(QueryError::UnexpectedRecords) => "dns_records",
            Reject::Dns(QueryError::BadName) => "dns_bad_name",
            Reject::Dns(QueryError::Malformed) => "dns_malformed",
            Reject::RateLimited => "rate_limited",
            Reject::Banned => "banned",
            Reject::UpstreamBudget => "upstream_budget",
        }
    }

    /// The request outcome this reason counts under.
    pub fn outcome(self) -> Outcome {
        match self {
            Reject::RateLimited => Outcome::RateLimited,
            Reject::Banned => Outcome::Banned,
            Reject::UpstreamBudget => Outcome::Overloaded,
            _ => Outcome::Rejected,
        }
    }

    /// Whether this reason adds to the client's penalty score. Malformed,
    /// oversized and obsolete requests do, and so does going over budget; a
    /// wrong path or method (a scanner, a typo) and our own overload do not.
    pub fn penalized(self) -> bool {
        !matches!(
            self,
            Reject::NotFound | Reject::Method | Reject::Banned | Reject::UpstreamBudget
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn labels_are_unique_snake_case() {
        let labels: HashSet<_> = Reject::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(labels.len(), Reject::ALL.len());
        for l in labels {
            assert!(
                l.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{l}"
            );
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
        assert_eq!(Reject::Dns(QueryError::TrailingBytes).status(), 400);
    }
}
