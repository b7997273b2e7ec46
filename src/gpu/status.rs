//! Reading the status words that the quantize kernel leaves: indices that come back from
//! the device are checked against the chunk they describe, and the first error is the one
//! the CPU finds first (the lowest row, then the lowest group).

/// What went wrong first in a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkError {
    /// A value that is not finite, at this column of the row.
    NonFinite { col: usize },
    /// The group (by index in its row) whose scale overflows the scale dtype.
    ScaleOverflow { group: usize },
}

/// "Nothing found", as the kernel leaves a status word.
pub const NONE: i64 = i64::MAX;

/// The first error of a chunk of `rows` rows of `cols` values in groups of `group`, from
/// the kernel's `bad` (the smallest row-major index of a non-finite value) and `over` (the
/// smallest index row·groups + group of a group whose scale overflows): `(row in the
/// chunk, what)`. An index outside the chunk is an error: the device is not trusted.
pub fn first_error(
    bad: i64,
    over: i64,
    rows: usize,
    cols: usize,
    group: usize,
) -> Result<Option<(usize, ChunkError)>, String> {
    let ng = cols.div_ceil(group.max(1));
    let check = |v: i64, limit: usize, what: &str| -> Result<Option<usize>, String> {
        if v == NONE {
            return Ok(None);
        }
        match usize::try_from(v) {
            Ok(i) if i < limit => Ok(Some(i)),
            _ => Err(format!(
                "the quantize kernel returned {what} {v}, outside its chunk of {rows} rows of {cols}"
            )),
        }
    };
    let nan = check(bad, rows * cols, "value index")?.map(|i| {
        let (row, col) = (i / cols, i % cols);
        (
            (row, col / group.max(1)),
            (row, ChunkError::NonFinite { col }),
        )
    });
    let ovf = check(over, rows * ng, "group index")?.map(|b| {
        let (row, g) = (b / ng, b % ng);
        ((row, g), (row, ChunkError::ScaleOverflow { group: g }))
    });
    Ok(match (nan, ovf) {
        (Some(a), Some(b)) => Some(if b.0 < a.0 { b.1 } else { a.1 }),
        (a, b) => a.or(b).map(|x| x.1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_earlier_overflowing_row_wins_over_a_later_nan() {
        // 4 rows of 8 in groups of 4: overflow in row 1 group 1 (index 3), NaN in row 2.
        let got = first_error(2 * 8 + 5, 3, 4, 8, 4).unwrap();
        assert_eq!(got, Some((1, ChunkError::ScaleOverflow { group: 1 })));
        // A NaN in an earlier row wins.
        let got = first_error(8 + 1, 2 * 2, 4, 8, 4).unwrap();
        assert_eq!(got, Some((1, ChunkError::NonFinite { col: 1 })));
        // Same row: the earlier group wins, whichever kind.
        let got = first_error(8 + 6, 2, 4, 8, 4).unwrap();
        assert_eq!(got, Some((1, ChunkError::ScaleOverflow { group: 0 })));
        let got = first_error(8 + 1, 3, 4, 8, 4).unwrap();
        assert_eq!(got, Some((1, ChunkError::NonFinite { col: 1 })));
        assert_eq!(first_error(NONE, NONE, 4, 8, 4).unwrap(), None);
    }

    #[test]
    fn indices_outside_the_chunk_are_refused() {
        assert!(first_error(32, NONE, 4, 8, 4).is_err());
        assert!(first_error(-1, NONE, 4, 8, 4).is_err());
        assert!(first_error(NONE, 8, 4, 8, 4).is_err());
        assert!(first_error(31, 7, 4, 8, 4).is_ok());
    }
}
