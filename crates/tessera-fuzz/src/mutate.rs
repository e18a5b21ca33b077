//! A small seeded mutator: the same seed gives the same inputs on every machine, so a run can
//! be replayed exactly (the driver relies on it to capture an input that crashed the process).

/// SplitMix64: fast, seeded, good enough to pick mutations.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator whose sequence is fixed by `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 { 0 } else { (self.next_u64() % n as u64) as usize }
    }

    /// True with probability 1 in `n`.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    /// A length from 1 to `max`, small ones far more often.
    fn small_len(&mut self, max: usize) -> usize {
        let max = max.max(1);
        let cap = match self.below(8) {
            0..=4 => 4,
            5 | 6 => 32,
            _ => 1024,
        };
        1 + self.below(cap.min(max))
    }
}

/// Bytes that matter to the formats under test: delimiters, quotes, escapes, edges.
const INTERESTING: [u8; 16] =
    [0, 1, 0x7f, 0x80, 0xff, b'"', b'\'', b'\n', b'\r', b'[', b']', b'{', b'}', b'\\', b'0', b'9'];

/// Mutates inputs: bit flips, byte sets, inserts, deletes, copies, repeats (deep nesting),
/// splices with another corpus entry, dictionary tokens, numbers swapped for edge values.
#[derive(Debug, Clone, Copy)]
pub struct Mutator<'a> {
    /// Tokens to insert.
    pub dictionary: &'a [&'a [u8]],
    /// Longest input produced.
    pub max_len: usize,
}

impl Mutator<'_> {
    /// Apply one to eight mutations to `input`; `other` is another corpus entry for splices.
    pub fn mutate(&self, rng: &mut Rng, input: &mut Vec<u8>, other: &[u8]) {
        let most = if rng.one_in(4) { 8 } else { 2 };
        let rounds = 1 + rng.below(most);
        for _ in 0..rounds {
            self.once(rng, input, other);
        }
        input.truncate(self.max_len);
    }

    fn once(&self, rng: &mut Rng, input: &mut Vec<u8>, other: &[u8]) {
        let len = input.len();
        let pos = rng.below(len + 1);
        match rng.below(14) {
            0 if len > 0 => {
                let i = rng.below(len);
                input[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                input[i] = rng.next_u64() as u8;
            }
            2 if len > 0 => {
                let i = rng.below(len);
                input[i] = INTERESTING[rng.below(INTERESTING.len())];
            }
            3 if len > 0 => {
                let i = rng.below(len);
                let delta = 1 + rng.below(8) as u8;
                input[i] = if rng.one_in(2) { input[i].wrapping_add(delta) } else { input[i].wrapping_sub(delta) };
            }
            4 => {
                let n = rng.small_len(8);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                input.splice(pos..pos, bytes);
            }
            5 if len > 0 => {
                let start = rng.below(len);
                let n = rng.small_len(len - start);
                input.drain(start..start + n);
            }
            6 if len > 0 => {
                // Copy a piece elsewhere.
                let start = rng.below(len);
                let n = rng.small_len(len - start);
                let piece = input[start..start + n].to_vec();
                input.splice(pos..pos, piece);
            }
            7 if len > 0 => {
                // Repeat a short piece many times: deep nesting, long runs.
                let start = rng.below(len);
                let n = rng.small_len((len - start).min(8));
                let times = if rng.one_in(8) { 64 + rng.below(8192) } else { 2 + rng.below(64) };
                let piece = input[start..start + n].to_vec();
                let room = self.max_len.saturating_sub(len) / n.max(1);
                let repeated = piece.repeat(times.min(room));
                input.splice(start..start, repeated);
            }
            8 | 9 if !self.dictionary.is_empty() => {
                let token = self.dictionary[rng.below(self.dictionary.len())];
                if rng.one_in(2) || len == 0 {
                    input.splice(pos..pos, token.iter().copied());
                } else {
                    let start = rng.below(len);
                    let end = (start + token.len()).min(len);
                    input.splice(start..end, token.iter().copied());
                }
            }
            10 if !other.is_empty() => {
                // Splice: this input's head, the other's tail.
                let cut = rng.below(other.len());
                input.truncate(pos);
                input.extend_from_slice(&other[cut..]);
            }
            11 if !other.is_empty() => {
                let start = rng.below(other.len());
                let n = rng.small_len(other.len() - start);
                input.splice(pos..pos, other[start..start + n].iter().copied());
            }
            12 if len > 0 => {
                // A run of digits becomes an edge number (from the dictionary when it has one).
                let i = rng.below(len);
                if let Some(start) = (0..=i).rev().take_while(|j| input[*j].is_ascii_digit()).last() {
                    let end = (i..len).take_while(|j| input[*j].is_ascii_digit()).last().map_or(i, |e| e + 1);
                    let numbers: Vec<&[u8]> =
                        self.dictionary.iter().copied().filter(|t| t.first().is_some_and(u8::is_ascii_digit)).collect();
                    if !numbers.is_empty() {
                        input.splice(start..end, numbers[rng.below(numbers.len())].iter().copied());
                    }
                }
            }
            13 if len > 1 => {
                input.truncate(rng.below(len));
            }
            _ => {
                let b = rng.next_u64() as u8;
                input.insert(pos, b);
            }
        }
    }
}

/// Edge values for varint fields.
const EDGE_VARINTS: [u64; 12] = [
    0,
    1,
    127,
    128,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX - 1,
    u64::MAX,
];

/// One field of a protobuf message, as the wire format has it.
#[derive(Debug, Clone)]
enum Field {
    Varint(u64, u64),
    Fixed64(u64, [u8; 8]),
    Bytes(u64, Vec<u8>),
    Fixed32(u64, [u8; 4]),
}

fn read_varint(data: &[u8], pos: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *data.get(*pos)?;
        *pos += 1;
        value |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

fn write_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// The fields of `data` if it is a well-formed protobuf message without groups.
fn parse_fields(data: &[u8]) -> Option<Vec<Field>> {
    let mut pos = 0;
    let mut fields = Vec::new();
    while pos < data.len() {
        let tag = read_varint(data, &mut pos)?;
        let number = tag >> 3;
        if number == 0 {
            return None;
        }
        fields.push(match tag & 7 {
            0 => Field::Varint(number, read_varint(data, &mut pos)?),
            1 => Field::Fixed64(number, data.get(pos..pos + 8)?.try_into().ok().inspect(|_| pos += 8)?),
            2 => {
                let len = usize::try_from(read_varint(data, &mut pos)?).ok()?;
                let bytes = data.get(pos..pos.checked_add(len)?)?.to_vec();
                pos += len;
                Field::Bytes(number, bytes)
            }
            5 => Field::Fixed32(number, data.get(pos..pos + 4)?.try_into().ok().inspect(|_| pos += 4)?),
            _ => return None,
        });
    }
    Some(fields)
}

fn encode_fields(fields: &[Field]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in fields {
        match f {
            Field::Varint(n, v) => {
                write_varint(&mut out, n << 3);
                write_varint(&mut out, *v);
            }
            Field::Fixed64(n, b) => {
                write_varint(&mut out, (n << 3) | 1);
                out.extend_from_slice(b);
            }
            Field::Bytes(n, b) => {
                write_varint(&mut out, (n << 3) | 2);
                write_varint(&mut out, b.len() as u64);
                out.extend_from_slice(b);
            }
            Field::Fixed32(n, b) => {
                write_varint(&mut out, (n << 3) | 5);
                out.extend_from_slice(b);
            }
        }
    }
    out
}

impl Mutator<'_> {
    /// A mutation that keeps the protobuf framing valid: a field's value becomes an edge value, a
    /// dictionary token or a mutated copy (nested messages recursively), or a field is repeated
    /// or dropped; the lengths are written again. False when `input` is not a protobuf message.
    pub fn mutate_proto(&self, rng: &mut Rng, input: &mut Vec<u8>, depth: u32) -> bool {
        let Some(mut fields) = parse_fields(input) else { return false };
        if fields.is_empty() {
            let number = 1 + rng.below(16) as u64;
            fields.push(Field::Varint(number, EDGE_VARINTS[rng.below(EDGE_VARINTS.len())]));
        } else {
            let i = rng.below(fields.len());
            match rng.below(8) {
                0 => {
                    fields.remove(i);
                }
                1 => {
                    let copy = fields[i].clone();
                    fields.insert(rng.below(fields.len() + 1), copy);
                }
                _ => match &mut fields[i] {
                    Field::Varint(_, v) => {
                        *v = if rng.one_in(3) { rng.next_u64() } else { EDGE_VARINTS[rng.below(EDGE_VARINTS.len())] }
                    }
                    Field::Fixed64(_, b) => *b = rng.next_u64().to_le_bytes(),
                    Field::Fixed32(_, b) => *b = (rng.next_u64() as u32).to_le_bytes(),
                    Field::Bytes(_, b) => {
                        let nested = depth < 4 && rng.one_in(2) && self.mutate_proto(rng, b, depth + 1);
                        if !nested {
                            if rng.one_in(3) && !self.dictionary.is_empty() {
                                *b = self.dictionary[rng.below(self.dictionary.len())].to_vec();
                            } else {
                                let other = b.clone();
                                self.once(rng, b, &other);
                            }
                        }
                    }
                },
            }
        }
        *input = encode_fields(&fields);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_inputs() {
        let m = Mutator { dictionary: &[b"token", b"123"], max_len: 256 };
        let run = |seed| {
            let mut rng = Rng::new(seed);
            let mut input = b"{\"step\": 12}".to_vec();
            for _ in 0..200 {
                m.mutate(&mut rng, &mut input, b"other input");
            }
            input
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn inputs_stay_within_the_limit() {
        let m = Mutator { dictionary: &[b"a long dictionary token"], max_len: 64 };
        let mut rng = Rng::new(1);
        let mut input = vec![b'x'; 60];
        for _ in 0..10_000 {
            m.mutate(&mut rng, &mut input, &[b'y'; 100]);
            assert!(input.len() <= 64);
        }
    }
}

#[cfg(test)]
mod proto_tests {
    use super::*;

    #[test]
    fn protobuf_mutations_keep_the_framing() {
        // field 1 = 150, field 2 = "testing", field 3 = { field 1 = 1 }
        let msg = b"\x08\x96\x01\x12\x07testing\x1a\x02\x08\x01".to_vec();
        assert_eq!(encode_fields(&parse_fields(&msg).unwrap()), msg);
        let m = Mutator { dictionary: &[b"18446744073709551615"], max_len: 1024 };
        let mut rng = Rng::new(3);
        for _ in 0..1000 {
            let mut input = msg.clone();
            assert!(m.mutate_proto(&mut rng, &mut input, 0));
            assert!(parse_fields(&input).is_some(), "{input:?}");
        }
        assert!(!m.mutate_proto(&mut rng, &mut b"\x0b\x0c".to_vec(), 0), "groups are not parsed");
    }
}
