//! Extractors whose rejections are the API's JSON errors.
//!
//! axum's own `Json`, `Query` and `Path` answer a bad request with a plain-text body; these
//! wrappers run the same parsing and turn every rejection into an [`ApiError`]:
//!
//! | problem | answer |
//! |---|---|
//! | content type missing or not JSON | 415 `unsupported_media_type` |
//! | body over the limit (see [`BodyLimit`]) | 413 `payload_too_large` |
//! | malformed JSON, wrong type, unknown or missing field | 400 `invalid_input` |
//! | bad query string or path segment | 400 `invalid_input` |

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::{header, request::Parts};
use futures::StreamExt;
use serde::de::DeserializeOwned;

use crate::error::{ApiError, ApiErrorCode};

/// Most bytes of an oversized body read and thrown away before answering 413. Answering while
/// the client is still sending makes the server close a connection with unread data, which
/// resets it, and the client may never see the 413; reading a bounded amount avoids that for
/// ordinary mistakes without letting a huge upload hold the connection.
pub(crate) const DRAIN_MAX: usize = 1024 * 1024;
/// Longest time spent draining an oversized body.
pub(crate) const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The request body limit in force, put in the request extensions by the router's guard.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BodyLimit(pub usize);

/// Reads and discards up to [`DRAIN_MAX`] more bytes of `body`, for at most [`DRAIN_TIMEOUT`].
pub(crate) async fn drain(body: Body) {
    let mut stream = body.into_data_stream();
    let mut seen = 0usize;
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while let Some(Ok(chunk)) = stream.next().await {
            seen += chunk.len();
            if seen > DRAIN_MAX {
                break;
            }
        }
    })
    .await;
}

pub(crate) fn too_large(limit: usize) -> ApiError {
    ApiError::new(ApiErrorCode::PayloadTooLarge, format!("request body exceeds the limit of {limit} bytes"))
}

/// A JSON body (`application/json` or `application/*+json`).
#[derive(Debug)]
pub(crate) struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, ApiError> {
        if !is_json(req.headers().get(header::CONTENT_TYPE)) {
            return Err(ApiError::new(
                ApiErrorCode::UnsupportedMediaType,
                "expected a JSON body with content-type: application/json",
            ));
        }
        let limit = req.extensions().get::<BodyLimit>().map_or(crate::DEFAULT_BODY_LIMIT, |l| l.0);
        let bytes = read_limited(req.into_body(), limit).await?;
        serde_json::from_slice(&bytes).map(ApiJson).map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")))
    }
}

/// The whole body if it fits in `limit` bytes; otherwise 413 (after a bounded drain).
async fn read_limited(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let mut stream = body.into_data_stream();
    let mut buf: Vec<u8> = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::invalid(format!("cannot read the request body: {e}")))?;
        if buf.len() + chunk.len() > limit {
            drain(Body::from_stream(stream)).await;
            return Err(too_large(limit));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(buf))
}

fn is_json(content_type: Option<&axum::http::HeaderValue>) -> bool {
    let Some(ct) = content_type.and_then(|v| v.to_str().ok()) else { return false };
    let essence = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// A query string.
#[derive(Debug)]
pub(crate) struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(v)| ApiQuery(v))
            .map_err(|r| ApiError::invalid(r.body_text()))
    }
}

/// Path parameters.
#[derive(Debug)]
pub(crate) struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<T>::from_request_parts(parts, state).await.map(|Path(v)| ApiPath(v)).map_err(|r| {
            if r.status().is_server_error() {
                ApiError::new(ApiErrorCode::Internal, r.body_text())
            } else {
                ApiError::invalid(r.body_text())
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn json_content_types() {
        let ok = ["application/json", "application/json; charset=utf-8", "Application/JSON", "application/merge-patch+json"];
        for ct in ok {
            assert!(is_json(Some(&HeaderValue::from_static(ct))), "{ct}");
        }
        for ct in ["text/plain", "application/x-www-form-urlencoded", "json", ""] {
            assert!(!is_json(Some(&HeaderValue::from_static(ct))), "{ct}");
        }
        assert!(!is_json(None));
    }
}
