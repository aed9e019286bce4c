//! The Redisson codecs overdue speaks. A codec decides how a Java value becomes the bytes inside
//! a packed member (and, after the transfer, in the destination list). overdue does not
//! translate: a timer's payload **is** the encoded value, byte for byte, in both directions. The
//! codec only decides what overdue accepts when it schedules a timer, so that what it writes is
//! something the Java side's codec can read.
//!
//! | URL name | Redisson codec | a value is | overdue accepts |
//! |---|---|---|---|
//! | `string` | `org.redisson.client.codec.StringCodec` (UTF-8) | the string's UTF-8 bytes | payloads that are valid UTF-8 |
//! | `json` | `org.redisson.codec.JsonJacksonCodec` | Jackson JSON with Redisson's default typing | one JSON document, typed as below |
//! | `bytes` | `org.redisson.client.codec.ByteArrayCodec` | the `byte[]` itself | any payload |
//!
//! ## `json`: what `JsonJacksonCodec` writes and reads
//!
//! Redisson's `JsonJacksonCodec` reads every value as `Object.class` with Jackson default typing
//! `NON_FINAL`, type id `Id.CLASS`, inclusion `As.PROPERTY` (property name `@class`), plus a rule
//! that always types `java.lang.Long`. So:
//!
//! - final "natural" types are plain JSON: a `String` is `"o-123"` (with the quotes), an
//!   `Integer` `42`, a `Double` `1.5`, a `Boolean` `true`;
//! - a `Long` is the wrapper array `["java.lang.Long",42]`;
//! - a bean or map is an object whose `@class` names the Java class:
//!   `{"@class":"com.shop.OrderClose","orderId":"o-123"}`; a collection is the wrapper array
//!   `["java.util.ArrayList",[…]]`.
//!
//! overdue writes the payload verbatim and checks only the top level: it must be one JSON
//! document, not `null` (Redisson refuses null values), an object must carry a string `@class`,
//! and an array must be the two-element wrapper `["<class>", <value>]`. Nested values are the
//! sender's business (their typing depends on the Java field types, which overdue cannot see).
//! Values a Java service offered reach overdue's handlers as the JSON text Jackson wrote,
//! `@class` and wrappers included.

use overdue_core::{Error, Result};

/// A Redisson codec (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Codec {
    /// `StringCodec`: UTF-8 text.
    #[default]
    String,
    /// `JsonJacksonCodec`: Jackson JSON with `@class` type information.
    Json,
    /// `ByteArrayCodec`: raw bytes.
    Bytes,
}

impl Codec {
    /// The URL name.
    pub fn as_str(self) -> &'static str {
        match self {
            Codec::String => "string",
            Codec::Json => "json",
            Codec::Bytes => "bytes",
        }
    }

    /// The Java class of the Redisson codec.
    pub fn java_class(self) -> &'static str {
        match self {
            Codec::String => "org.redisson.client.codec.StringCodec",
            Codec::Json => "org.redisson.codec.JsonJacksonCodec",
            Codec::Bytes => "org.redisson.client.codec.ByteArrayCodec",
        }
    }

    /// Parses a URL name; also accepts the Java class's simple name (`StringCodec`, …).
    pub fn parse(s: &str) -> Option<Codec> {
        match s.to_ascii_lowercase().as_str() {
            "string" | "stringcodec" => Some(Codec::String),
            "json" | "jsonjacksoncodec" => Some(Codec::Json),
            "bytes" | "bytearraycodec" => Some(Codec::Bytes),
            _ => None,
        }
    }

    /// Checks that `payload` is a value this codec's Java side can decode; the error says why
    /// not. Nothing is written when it fails.
    pub fn check(self, queue: &str, key: &str, payload: &[u8]) -> Result<()> {
        let bad = |why: String| {
            Err(Error::Config(format!(
                "the payload of timer ({queue}, {key}) cannot be written with the redisson {} codec ({}): {why}",
                self.as_str(),
                self.java_class()
            )))
        };
        match self {
            Codec::Bytes => Ok(()),
            Codec::String => match std::str::from_utf8(payload) {
                Ok(_) => Ok(()),
                Err(e) => bad(format!("it is not valid UTF-8 ({e})")),
            },
            Codec::Json => {
                let v: serde_json::Value = match serde_json::from_slice(payload) {
                    Ok(v) => v,
                    Err(e) => return bad(format!("it is not one JSON document ({e})")),
                };
                match &v {
                    serde_json::Value::Null => bad("null is not a value redisson accepts".into()),
                    serde_json::Value::Object(o) if !o.get("@class").is_some_and(|c| c.is_string()) => {
                        bad("a JSON object needs a string \"@class\" property naming its java class".into())
                    }
                    serde_json::Value::Array(a) if !(a.len() == 2 && a[0].is_string()) => bad(
                        "a JSON array must be jackson's type wrapper [\"<java class>\", <value>], e.g. [\"java.util.ArrayList\",[1,2]]"
                            .into(),
                    ),
                    _ => Ok(()),
                }
            }
        }
    }
}

/// The JSON a `JsonJacksonCodec` writes for a Java `String`: a JSON string literal.
pub fn json_string(s: &str) -> Vec<u8> {
    serde_json::Value::String(s.to_owned()).to_string().into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codecs_accept_what_their_java_side_reads() {
        assert!(Codec::Bytes.check("q", "k", &[0xff, 0]).is_ok());
        assert!(Codec::String.check("q", "k", "ünï".as_bytes()).is_ok());
        let e = Codec::String.check("q", "k", &[0xff]).expect_err("not utf-8").to_string();
        assert!(e.contains("StringCodec") && e.contains("UTF-8"), "{e}");
        for ok in [&br#""o-1""#[..], b"42", b"true", br#"["java.lang.Long",42]"#, br#"{"x":1,"@class":"com.A"}"#] {
            assert!(Codec::Json.check("q", "k", ok).is_ok(), "{}", String::from_utf8_lossy(ok));
        }
        for bad in [&b"o-1"[..], b"null", br#"{"x":1}"#, br#"[1,2]"#, b"{", br#"{"@class":1}"#] {
            let e = Codec::Json.check("q", "k", bad).expect_err("bad json").to_string();
            assert!(e.starts_with("invalid configuration: the payload of timer (q, k)"), "{e}");
        }
        assert_eq!(json_string("o-\"1\""), br#""o-\"1\"""#);
    }
}
