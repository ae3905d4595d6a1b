//! Disconnect error codes: the `errcode` label and the `reason` class behind it.
//!
//! Tencent reworded `errmsg` several times over the years, so the class is keyed on the numeric
//! code only (see the disconnect error code table of the callback protocol).

use std::fmt;
use std::sync::OnceLock;

/// (errcode, weight) of the disconnects in generated traffic (`simulate`, `load`): mostly
/// clients stopping, some operator actions, a tail of faults of every abnormal class.
pub const TRAFFIC_MIX: [(i64, u64); 10] = [
    (1, 40),
    (3, 20),
    (21, 10),
    (8, 8),
    (12, 8),
    (14, 4),
    (18, 4),
    (7, 3),
    (5, 2),
    (2, 1),
];

/// The cause class of a disconnect, the `reason` label of `tencent_css_disconnects_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    ClientStop,
    Operator,
    NoData,
    Network,
    Protocol,
    Internal,
    Rejected,
    Unknown,
}

impl Reason {
    pub const ALL: [Reason; 8] = [
        Reason::ClientStop,
        Reason::Operator,
        Reason::NoData,
        Reason::Network,
        Reason::Protocol,
        Reason::Internal,
        Reason::Rejected,
        Reason::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::ClientStop => "client_stop",
            Reason::Operator => "operator",
            Reason::NoData => "no_data",
            Reason::Network => "network",
            Reason::Protocol => "protocol",
            Reason::Internal => "internal",
            Reason::Rejected => "rejected",
            Reason::Unknown => "unknown",
        }
    }

    /// Normal disconnects are the ones the customer or their client asked for.
    pub fn is_abnormal(self) -> bool {
        !matches!(self, Reason::ClientStop | Reason::Operator)
    }
}

/// A disconnect code as it is labelled: codes 0..=999 keep their number, anything else (negative,
/// huge, nonsense) collapses into one `other` series so a misbehaving sender cannot create
/// unbounded label values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ErrCode(Option<u16>);

impl ErrCode {
    pub fn new(code: i64) -> Self {
        ErrCode(u16::try_from(code).ok().filter(|c| *c <= 999))
    }

    /// Parses the label value back (the store keeps labels as text).
    pub fn from_label(label: &str) -> Option<Self> {
        if label == "other" {
            return Some(ErrCode(None));
        }
        let code: u16 = label.parse().ok()?;
        (code <= 999).then_some(ErrCode(Some(code)))
    }

    /// The label value: the decimal code, or `other`.
    pub fn as_str(self) -> &'static str {
        static DECIMAL: OnceLock<Vec<String>> = OnceLock::new();
        match self.0 {
            Some(code) => {
                let decimal = DECIMAL.get_or_init(|| (0..=999).map(|c| c.to_string()).collect());
                &decimal[usize::from(code)]
            }
            None => "other",
        }
    }

    /// A key that orders codes as their label values order as text ("14" before "8", "other"
    /// last), as the text format's series are ordered, without comparing strings.
    pub fn text_rank(self) -> u16 {
        static RANK: OnceLock<Vec<u16>> = OnceLock::new();
        match self.0 {
            Some(code) => {
                let rank = RANK.get_or_init(|| {
                    let mut by_text: Vec<u16> = (0..=999).collect();
                    by_text.sort_by_cached_key(|c| c.to_string());
                    let mut rank = vec![0; by_text.len()];
                    for (r, c) in by_text.into_iter().enumerate() {
                        rank[usize::from(c)] = r as u16;
                    }
                    rank
                });
                rank[usize::from(code)]
            }
            None => 1000,
        }
    }

    pub fn reason(self) -> Reason {
        match self.0 {
            Some(1..=4 | 35) => Reason::ClientStop,
            Some(21) => Reason::Operator,
            Some(8 | 20) => Reason::NoData,
            Some(12..=17) => Reason::Network,
            Some(6 | 7 | 23 | 33) => Reason::Protocol,
            Some(5 | 9..=11 | 24) => Reason::Internal,
            Some(18 | 19) => Reason::Rejected,
            _ => Reason::Unknown,
        }
    }
}

impl fmt::Display for ErrCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(code: i64) -> &'static str {
        ErrCode::new(code).reason().as_str()
    }

    #[test]
    fn classes_follow_the_protocol_table() {
        for code in [1, 2, 3, 4, 35] {
            assert_eq!(reason(code), "client_stop", "errcode {code}");
        }
        assert_eq!(reason(21), "operator");
        for code in [8, 20] {
            assert_eq!(reason(code), "no_data", "errcode {code}");
        }
        for code in 12..=17 {
            assert_eq!(reason(code), "network", "errcode {code}");
        }
        for code in [6, 7, 23, 33] {
            assert_eq!(reason(code), "protocol", "errcode {code}");
        }
        for code in [5, 9, 10, 11, 24] {
            assert_eq!(reason(code), "internal", "errcode {code}");
        }
        for code in [18, 19] {
            assert_eq!(reason(code), "rejected", "errcode {code}");
        }
        for code in [
            0,
            22,
            25,
            26,
            27,
            28,
            29,
            30,
            31,
            32,
            34,
            36,
            999,
            -1,
            1000,
            i64::MAX,
        ] {
            assert_eq!(reason(code), "unknown", "errcode {code}");
        }
    }

    #[test]
    fn only_normal_classes_are_not_abnormal() {
        let abnormal: Vec<_> = Reason::ALL.iter().filter(|r| r.is_abnormal()).collect();
        assert_eq!(abnormal.len(), 6);
        assert!(!Reason::ClientStop.is_abnormal());
        assert!(!Reason::Operator.is_abnormal());
    }

    #[test]
    fn label_is_decimal_or_other_and_round_trips() {
        assert_eq!(ErrCode::new(0).to_string(), "0");
        assert_eq!(ErrCode::new(999).to_string(), "999");
        assert_eq!(ErrCode::new(1000).to_string(), "other");
        assert_eq!(ErrCode::new(-3).to_string(), "other");
        for code in [0, 18, 999, 5000] {
            let label = ErrCode::new(code).to_string();
            assert_eq!(ErrCode::from_label(&label), Some(ErrCode::new(code)));
        }
        for code in 0..=999 {
            assert_eq!(ErrCode::new(code).as_str(), code.to_string());
        }
        assert_eq!(ErrCode::new(1000).as_str(), "other");
        assert_eq!(ErrCode::from_label("1000"), None);
        assert_eq!(ErrCode::from_label("x"), None);
    }

    #[test]
    fn text_rank_orders_as_the_labels_do() {
        let mut codes: Vec<ErrCode> = (0..=999).map(ErrCode::new).collect();
        codes.push(ErrCode::new(-1));
        let mut by_rank = codes.clone();
        by_rank.sort_by_key(|c| c.text_rank());
        let mut by_text = codes;
        by_text.sort_by_key(|c| c.as_str());
        assert_eq!(by_rank, by_text);
        assert_eq!(by_rank.last(), Some(&ErrCode::new(-1)));
    }
}
