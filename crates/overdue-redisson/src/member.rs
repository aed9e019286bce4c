//! The packed member Redisson stores for each delayed item, in Rust (the store itself packs and
//! unpacks in Lua, with the same `struct` library Redisson's scripts use; this module is the
//! byte-for-byte description, used by tests and by anyone reading the keys by hand).
//!
//! Redisson's offer script packs the encoded value together with a random id, so that the same
//! value offered twice is two members of the timeout sorted set. Two layouts exist:
//!
//! | [`MemberFormat`] | Lua (Redisson's offer script) | bytes |
//! |---|---|---|
//! | `Bc0Lc0` (current) | `struct.pack('Bc0Lc0', string.len(ARGV[2]), ARGV[2], string.len(ARGV[3]), ARGV[3])`, `ARGV[2]` = 8 random bytes | `08` · 8 id bytes · value length as u64 little-endian · value |
//! | `dLc0` (older) | `struct.pack('dLc0', tonumber(ARGV[2]), string.len(ARGV[3]), ARGV[3])`, `ARGV[2]` = a random `long` in decimal | id as an f64 (8 bytes, little-endian) · value length as u64 little-endian · value |
//!
//! Redis's `struct` library packs in the host's byte order with no alignment (its defaults) and
//! `L` is a C `unsigned long`: 8 bytes, little-endian on the x86-64 and arm64 hosts Redis runs
//! on. Unpacking ignores bytes after the value, as `struct.unpack` does.

/// Which of Redisson's two member layouts a queue uses (URL parameter `member`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum MemberFormat {
    /// `struct.pack('Bc0Lc0', …)`: a length-prefixed random id. Redisson's current source.
    #[default]
    Bc0Lc0,
    /// `struct.pack('dLc0', …)`: the random id as a double. Older Redisson releases.
    DLc0,
}

impl MemberFormat {
    /// The `struct` format string, as in Redisson's scripts.
    pub fn as_str(self) -> &'static str {
        match self {
            MemberFormat::Bc0Lc0 => "Bc0Lc0",
            MemberFormat::DLc0 => "dLc0",
        }
    }

    /// Parses the URL spelling (`Bc0Lc0` or `dLc0`, case-insensitive).
    pub fn parse(s: &str) -> Option<MemberFormat> {
        match s.to_ascii_lowercase().as_str() {
            "bc0lc0" => Some(MemberFormat::Bc0Lc0),
            "dlc0" => Some(MemberFormat::DLc0),
            _ => None,
        }
    }
}

/// Size of Redis's `struct` `L` (a C `unsigned long` on 64-bit hosts).
const LEN_BYTES: usize = 8;

/// Packs `value` with the random id `id` as Redisson's current offer script does
/// (`Bc0Lc0`). `id` is at most 255 bytes (Redisson uses 8).
pub fn pack_bc0lc0(id: &[u8], value: &[u8]) -> Vec<u8> {
    let id = &id[..id.len().min(255)];
    let mut m = Vec::with_capacity(1 + id.len() + LEN_BYTES + value.len());
    m.push(id.len() as u8);
    m.extend_from_slice(id);
    m.extend_from_slice(&(value.len() as u64).to_le_bytes());
    m.extend_from_slice(value);
    m
}

/// Packs `value` with the random id `id` as older Redisson offer scripts do (`dLc0`): the
/// id is converted to a double first (Lua's `tonumber`).
pub fn pack_dlc0(id: i64, value: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(8 + LEN_BYTES + value.len());
    m.extend_from_slice(&(id as f64).to_le_bytes());
    m.extend_from_slice(&(value.len() as u64).to_le_bytes());
    m.extend_from_slice(value);
    m
}

/// Why a member does not unpack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// The random id and the encoded value of a member, as `struct.unpack(format, member)` would
/// return them; an error (never a panic) for bytes that are too short.
pub fn unpack(format: MemberFormat, member: &[u8]) -> Result<(&[u8], &[u8]), Malformed> {
    let id_end = match format {
        MemberFormat::Bc0Lc0 => {
            let n = *member.first().ok_or(Malformed("empty member"))? as usize;
            1 + n
        }
        MemberFormat::DLc0 => 8,
    };
    let id_start = if format == MemberFormat::Bc0Lc0 { 1 } else { 0 };
    let len_end = id_end + LEN_BYTES;
    let len_bytes = member.get(id_end..len_end).ok_or(Malformed("member shorter than its header"))?;
    let mut len = [0u8; LEN_BYTES];
    len.copy_from_slice(len_bytes);
    let len = u64::from_le_bytes(len);
    let value_end = usize::try_from(len).ok().and_then(|l| len_end.checked_add(l)).ok_or(Malformed("value length out of range"))?;
    let value = member.get(len_end..value_end).ok_or(Malformed("member shorter than its value length"))?;
    Ok((&member[id_start..id_end], value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bc0lc0_is_length_prefixed_id_then_le64_length_then_value() {
        let m = pack_bc0lc0(&[1, 2, 3, 4, 5, 6, 7, 8], b"\"hi\"");
        assert_eq!(m, [&[8u8, 1, 2, 3, 4, 5, 6, 7, 8][..], &[4, 0, 0, 0, 0, 0, 0, 0], b"\"hi\""].concat());
        assert_eq!(unpack(MemberFormat::Bc0Lc0, &m), Ok((&[1u8, 2, 3, 4, 5, 6, 7, 8][..], &b"\"hi\""[..])));
    }

    #[test]
    fn dlc0_matches_a_member_redisson_wrote() {
        // From a MONITOR trace of Redisson's dLc0 offer script: randomId 5220409939115423359,
        // value "\"helloworld00\"" (JsonJacksonCodec of a String).
        let m = pack_dlc0(5_220_409_939_115_423_359, b"\"helloworld00\"");
        let mut want = b".\xb9\x90\xcb\xa7\x1c\xd2C\x0e\x00\x00\x00\x00\x00\x00\x00".to_vec();
        want.extend_from_slice(b"\"helloworld00\"");
        assert_eq!(m, want);
        assert_eq!(unpack(MemberFormat::DLc0, &m).map(|(_, v)| v), Ok(&b"\"helloworld00\""[..]));
    }

    #[test]
    fn malformed_members_are_errors_not_panics() {
        for bad in [&b""[..], b"\x08abc", b"\x08abcdefgh\x05\0\0\0\0\0\0\0abc", b"\xffxx", b"\0\xff\xff\xff\xff\xff\xff\xff\xff"] {
            assert!(unpack(MemberFormat::Bc0Lc0, bad).is_err(), "{bad:?}");
        }
        assert!(unpack(MemberFormat::DLc0, b"12345678\x01").is_err());
        // Trailing bytes after the value are ignored, as struct.unpack ignores them.
        assert_eq!(unpack(MemberFormat::Bc0Lc0, b"\0\x01\0\0\0\0\0\0\0xyz").map(|(_, v)| v), Ok(&b"x"[..]));
    }
}
