//! Gzip for `/metrics` pages, compressed in pieces on several threads.
//!
//! Prometheus asks every scrape for gzip, and compressing the 5-MB page of 1,000 domains at
//! level 1 takes 1.4 to 14 ms of one core, depending on the day: more than writing the page.
//! A page of several megabytes is cut into pieces compressed side by side, the way `pigz`
//! does: each piece is a raw deflate stream of its own ended by a sync flush (a byte-aligned,
//! non-final empty block), the last one by the final block, so that the pieces laid end to end
//! are one deflate stream, and the whole is one gzip member whose CRC is combined from the
//! pieces'. Any gzip reader reads it, including those that stop after the first member. A
//! piece starts with an empty dictionary, which costs well under 1 % of the size with pieces
//! of a megabyte or more.

use std::io;
use std::sync::OnceLock;

use flate2::{Compress, Compression, Crc, FlushCompress, Status};

/// Pages are cut into pieces of at least this size: below it, a thread's start and the
/// pieces' lost context cost more than they save.
const MIN_PIECE: usize = 1 << 20;

/// At most this many threads compress one page, so that a scrape on a large machine does not
/// take every core from the callbacks for its few milliseconds.
const MAX_THREADS: usize = 4;

/// `page` as a gzip stream at level 1, compressed on as many threads as the machine has cores
/// (at most `MAX_THREADS`) and as the page has pieces of `MIN_PIECE`.
pub fn compress(page: &[u8]) -> io::Result<Vec<u8>> {
    static THREADS: OnceLock<usize> = OnceLock::new();
    let threads = *THREADS.get_or_init(|| {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_THREADS))
    });
    in_pieces(page, (page.len() / MIN_PIECE).clamp(1, threads))
}

/// `page` as one gzip member compressed in `pieces` pieces of about the same size, the first on
/// this thread and the others on threads of their own.
fn in_pieces(page: &[u8], pieces: usize) -> io::Result<Vec<u8>> {
    let size = page.len().div_ceil(pieces.max(1)).max(1);
    let mut pieces = page.chunks(size);
    let first = pieces.next().unwrap_or_default();
    let rest: Vec<&[u8]> = pieces.collect();
    let compressed = std::thread::scope(|scope| {
        let others: Vec<_> = rest
            .iter()
            .enumerate()
            .map(|(i, &piece)| {
                let last = i + 1 == rest.len();
                std::thread::Builder::new()
                    .name("metrics-gzip".into())
                    .spawn_scoped(scope, move || deflate(piece, last))
            })
            .collect();
        let first = deflate(first, rest.is_empty());
        // Every thread is joined before any error is returned: the scope would panic on a
        // thread that panicked and was not joined.
        let others = others.into_iter().map(|other| {
            other?
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("a thread compressing the page panicked")))
        });
        std::iter::once(first)
            .chain(others)
            .collect::<Vec<_>>()
            .into_iter()
            .collect::<io::Result<Vec<_>>>()
    })?;

    let body: usize = compressed.iter().map(|(piece, _)| piece.len()).sum();
    let mut gzip = Vec::with_capacity(10 + body + 8);
    // RFC 1952: magic, deflate, no flags, no time, "fastest" (level 1), OS unknown.
    gzip.extend_from_slice(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 4, 0xff]);
    let mut crc = Crc::new();
    for (piece, piece_crc) in &compressed {
        gzip.extend_from_slice(piece);
        crc.combine(piece_crc);
    }
    gzip.extend_from_slice(&crc.sum().to_le_bytes());
    // The size modulo 2^32, as the format says.
    gzip.extend_from_slice(&(page.len() as u32).to_le_bytes());
    Ok(gzip)
}

/// `piece` as raw deflate at level 1, ended by the final block if it is the `last` piece and by
/// a sync flush otherwise, with its CRC.
fn deflate(piece: &[u8], last: bool) -> io::Result<(Vec<u8>, Crc)> {
    let mut crc = Crc::new();
    crc.update(piece);
    let (flush, end) = if last {
        (FlushCompress::Finish, Status::StreamEnd)
    } else {
        (FlushCompress::Sync, Status::Ok)
    };
    // One call compresses and flushes the whole piece: miniz_oxide's sync flush, when the
    // output fills up, may stop short of the end or write a second sync marker when asked
    // again (Frommi/miniz_oxide#105); incompressible pieces of about 58 KB lost their end that
    // way. Text shrinks 15 to 20 times, so an eighth of the piece is room enough; a piece that
    // does not fit is compressed again into room for the worst case. (Room of the worst case
    // every time kept about 6 MiB more resident after scrapes of 1,000 domains.)
    for room in [piece.len() / 8, piece.len() + piece.len() / 8] {
        let mut compress = Compress::new(Compression::fast(), false);
        let mut out = Vec::with_capacity(room + 1024);
        let status = compress
            .compress_vec(piece, &mut out, flush)
            .map_err(io::Error::other)?;
        // As with zlib, a flush is complete when it leaves room in the output.
        if status == end && compress.total_in() == piece.len() as u64 && out.len() < out.capacity()
        {
            return Ok((out, crc));
        }
    }
    Err(io::Error::other(
        "deflate did not fit the worst case's room",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    use proptest::prelude::*;

    /// What a gzip reader that reads one member only (as `flate2`'s `GzDecoder` does) makes of
    /// `gzip`; it checks the CRC and the size.
    fn gunzip(gzip: &[u8]) -> Vec<u8> {
        let mut page = Vec::new();
        flate2::read::GzDecoder::new(gzip)
            .read_to_end(&mut page)
            .expect("one valid gzip member");
        page
    }

    /// Text like a page's: repeated names and labels, changing numbers.
    fn page_like(lines: usize) -> Vec<u8> {
        (0..lines)
            .map(|i| {
                format!(
                    "tencent_css_push_duration_seconds_bucket{{domain=\"d{}.example.com\",area=\"mainland\",le=\"{}\"}} {}\n",
                    i % 1000,
                    i % 13,
                    i * 7919 % 100_003
                )
            })
            .collect::<String>()
            .into_bytes()
    }

    #[test]
    fn a_page_in_pieces_is_one_gzip_member_of_the_page() {
        let page = page_like(60_000);
        assert!(page.len() > 4 * MIN_PIECE);
        let whole = in_pieces(&page, 1).unwrap();
        for pieces in [1, 2, 3, 4, 7] {
            let gzip = in_pieces(&page, pieces).unwrap();
            assert_eq!(gunzip(&gzip), page, "{pieces} pieces");
            // Pieces lose only their first 32 KiB of context.
            assert!(
                gzip.len() < whole.len() + whole.len() / 50,
                "{pieces} pieces: {} bytes against {} in one",
                gzip.len(),
                whole.len()
            );
        }
        assert_eq!(gunzip(&compress(&page).unwrap()), page);
    }

    #[test]
    fn empty_and_tiny_pages_compress() {
        for page in [&b""[..], b"x", b"# EOF\n"] {
            for pieces in [1, 2, 5] {
                assert_eq!(gunzip(&in_pieces(page, pieces).unwrap()), page);
            }
        }
    }

    #[test]
    fn incompressible_pieces_of_about_58_kb_round_trip() {
        // Found by the property below: with a sync flush continued in a second call,
        // miniz_oxide lost the end of such pieces.
        let mut x: u64 = 88_172_645_463_325_252;
        for len in [116_767, 117_266, 175_150, 1 << 20] {
            let page: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            for pieces in 2..5 {
                assert_eq!(
                    gunzip(&in_pieces(&page, pieces).unwrap()),
                    page,
                    "{len} in {pieces}"
                );
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Incompressible bytes make the output outgrow its first buffer, in every piece.
        #[test]
        fn any_bytes_in_any_pieces_round_trip(
            page in proptest::collection::vec(any::<u8>(), 0..200_000),
            pieces in 1usize..9,
        ) {
            prop_assert_eq!(gunzip(&in_pieces(&page, pieces).unwrap()), page);
        }
    }
}
