//! Where a stream was pushed: the `area` label, derived from `set_id`.

/// Tencent's own APIs call this split Mainland / Oversea.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Area {
    Mainland,
    Overseas,
    Unknown,
}

impl Area {
    /// `set_id` 1-6 is the Chinese mainland, 7-200 outside it; anything else (absent, 0,
    /// out of range) says nothing reliable.
    pub fn from_set_id(set_id: Option<i64>) -> Self {
        match set_id {
            Some(1..=6) => Area::Mainland,
            Some(7..=200) => Area::Overseas,
            _ => Area::Unknown,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Area::Mainland => "mainland",
            Area::Overseas => "overseas",
            Area::Unknown => "unknown",
        }
    }

    pub fn from_label(label: &str) -> Option<Self> {
        match label {
            "mainland" => Some(Area::Mainland),
            "overseas" => Some(Area::Overseas),
            "unknown" => Some(Area::Unknown),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_id_ranges_map_to_areas() {
        for id in 1..=6 {
            assert_eq!(Area::from_set_id(Some(id)), Area::Mainland, "set_id {id}");
        }
        for id in [7, 8, 100, 200] {
            assert_eq!(Area::from_set_id(Some(id)), Area::Overseas, "set_id {id}");
        }
        for id in [None, Some(0), Some(-1), Some(201), Some(i64::MAX)] {
            assert_eq!(Area::from_set_id(id), Area::Unknown, "set_id {id:?}");
        }
    }

    #[test]
    fn labels_round_trip() {
        for area in [Area::Mainland, Area::Overseas, Area::Unknown] {
            assert_eq!(Area::from_label(area.as_str()), Some(area));
        }
        assert_eq!(Area::from_label("mars"), None);
    }
}
