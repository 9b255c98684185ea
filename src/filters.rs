//! Which products to download, with astroquery's `filter_products` rules: per field, a list of values
//! means any of them (OR), a value starting with `!` excludes, and fields combine with AND. `program` also
//! takes comparisons (`>1000`, `<=2000`) and ranges (`100..200`, both ends included); `filename` takes
//! glob patterns (`*_cal.fits`). Events filtered out are still recorded, only not downloaded.

use serde::{Deserialize, Serialize};

use crate::notice::Event;

/// `[filters]`, and the `download` command's `--event-type`, `--mission`, `--program`, `--filename`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct FiltersConfig {
    /// Only these event types (New, First, Reprocessed, Public); `!X` excludes. Repeat or separate with commas.
    #[arg(long = "event-type", value_name = "TYPE", value_delimiter = ',')]
    pub event_type: Vec<String>,
    /// Only these missions; `!X` excludes.
    #[arg(long, value_name = "MISSION", value_delimiter = ',')]
    pub mission: Vec<String>,
    /// Only these programs: N, >N, >=N, <N, <=N, A..B; `!` excludes.
    #[arg(
        long,
        value_name = "PROGRAM",
        value_delimiter = ',',
        allow_hyphen_values = true
    )]
    pub program: Vec<String>,
    /// Only files matching these globs; `!GLOB` excludes.
    #[arg(long, value_name = "GLOB", value_delimiter = ',')]
    pub filename: Vec<String>,
}

/// A checked set of filters.
#[derive(Debug, Clone, Default)]
pub struct Filters {
    event_type: Field<String>,
    mission: Field<String>,
    program: Field<ProgramRule>,
    filename: Field<glob::Pattern>,
}

/// One field's rules: included values (any), excluded values (none).
#[derive(Debug, Clone)]
struct Field<T> {
    include: Vec<(String, T)>,
    exclude: Vec<(String, T)>,
}

impl<T> Default for Field<T> {
    fn default() -> Self {
        Field {
            include: Vec::new(),
            exclude: Vec::new(),
        }
    }
}

impl<T> Field<T> {
    fn parse(
        name: &str,
        values: &[String],
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Field<T>, String> {
        let mut f = Field::default();
        for v in values {
            let v = v.trim();
            let (negated, rule) = match v.strip_prefix('!') {
                Some(rest) => (true, rest.trim()),
                None => (false, v),
            };
            if rule.is_empty() {
                return Err(format!("filter {name}: an empty value"));
            }
            let parsed = parse(rule).map_err(|e| format!("filter {name} = {v:?}: {e}"))?;
            if negated {
                f.exclude.push((v.to_string(), parsed));
            } else {
                f.include.push((v.to_string(), parsed));
            }
        }
        Ok(f)
    }

    /// Why `value` is refused, if it is.
    fn refuses(&self, name: &str, shown: &str, matches: impl Fn(&T) -> bool) -> Option<String> {
        if let Some((rule, _)) = self.exclude.iter().find(|(_, r)| matches(r)) {
            return Some(format!("{name} {shown} is excluded by {rule}"));
        }
        if !self.include.is_empty() && !self.include.iter().any(|(_, r)| matches(r)) {
            let rules: Vec<&str> = self.include.iter().map(|(s, _)| s.as_str()).collect();
            return Some(format!("{name} {shown} is not {}", rules.join(" or ")));
        }
        None
    }
}

/// A program rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProgramRule {
    Is(i64),
    Above(i64, bool),
    Below(i64, bool),
    Range(i64, i64),
}

impl ProgramRule {
    fn parse(s: &str) -> Result<ProgramRule, String> {
        let num = |t: &str| {
            t.trim()
                .parse::<i64>()
                .map_err(|_| format!("{t:?} is not a program number"))
        };
        if let Some((a, b)) = s.split_once("..") {
            let (a, b) = (num(a)?, num(b)?);
            if a > b {
                return Err(format!("the range {a}..{b} is empty"));
            }
            return Ok(ProgramRule::Range(a, b));
        }
        if let Some(r) = s.strip_prefix(">=") {
            return Ok(ProgramRule::Above(num(r)?, true));
        }
        if let Some(r) = s.strip_prefix("<=") {
            return Ok(ProgramRule::Below(num(r)?, true));
        }
        if let Some(r) = s.strip_prefix('>') {
            return Ok(ProgramRule::Above(num(r)?, false));
        }
        if let Some(r) = s.strip_prefix('<') {
            return Ok(ProgramRule::Below(num(r)?, false));
        }
        num(s)
            .map(ProgramRule::Is)
            .map_err(|e| format!("{e} (expected N, >N, >=N, <N, <=N or A..B)"))
    }

    fn matches(self, p: i64) -> bool {
        match self {
            ProgramRule::Is(n) => p == n,
            ProgramRule::Above(n, eq) => p > n || (eq && p == n),
            ProgramRule::Below(n, eq) => p < n || (eq && p == n),
            ProgramRule::Range(a, b) => (a..=b).contains(&p),
        }
    }
}

impl Filters {
    /// Checks the rules; an error names the field and the value.
    pub fn new(c: &FiltersConfig) -> Result<Filters, String> {
        Ok(Filters {
            event_type: Field::parse("event_type", &c.event_type, |s| {
                // The four types MAST documents; a typo must not pass silently as a type of its own
                // (types mastsub does not know are governed by `[events] other`).
                ["new", "first", "reprocessed", "public"]
                    .contains(&s.to_ascii_lowercase().as_str())
                    .then(|| s.to_ascii_lowercase())
                    .ok_or_else(|| "expected New, First, Reprocessed or Public".to_string())
            })?,
            mission: Field::parse("mission", &c.mission, |s| Ok(s.to_ascii_lowercase()))?,
            program: Field::parse("program", &c.program, ProgramRule::parse)?,
            filename: Field::parse("filename", &c.filename, |s| {
                glob::Pattern::new(s).map_err(|e| e.to_string())
            })?,
        })
    }

    /// Whether any rule is set.
    pub fn is_empty(&self) -> bool {
        self.event_type.include.is_empty()
            && self.event_type.exclude.is_empty()
            && self.mission.include.is_empty()
            && self.mission.exclude.is_empty()
            && self.program.include.is_empty()
            && self.program.exclude.is_empty()
            && self.filename.include.is_empty()
            && self.filename.exclude.is_empty()
    }

    /// Why `event` is filtered out, or `None` if it passes.
    pub fn refuses(&self, event: &Event) -> Option<String> {
        let et = event.event_type.to_string();
        let et_lower = et.to_ascii_lowercase();
        let mission = event.mission.to_ascii_lowercase();
        self.event_type
            .refuses("event type", &et, |r| *r == et_lower)
            .or_else(|| {
                self.mission
                    .refuses("mission", &event.mission, |r| *r == mission)
            })
            .or_else(|| {
                self.program
                    .refuses("program", &event.program.to_string(), |r| {
                        r.matches(event.program)
                    })
            })
            .or_else(|| {
                self.filename
                    .refuses("file", &event.filename, |r| r.matches(&event.filename))
            })
            .map(|why| format!("filtered out: {why}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(program: i64, event_type: &str, mission: &str, filename: &str) -> Event {
        let json = serde_json::json!([{
            "event_id": "00000000-0000-4000-8000-000000000001",
            "mission": mission, "fileset": "fs", "filename": filename, "program": program,
            "event_type": event_type, "archived_date": "2026-01-01T00:00:00",
            "public_release_date": "2026-01-01T00:00:00"
        }]);
        let parsed =
            crate::notice::parse(&serde_json::to_vec(&json).unwrap(), &Default::default()).unwrap();
        parsed.events.into_iter().next().unwrap()
    }

    fn filters(f: FiltersConfig) -> Filters {
        Filters::new(&f).unwrap()
    }

    #[test]
    fn each_rule_selects_what_it_says() {
        let e = event(1500, "New", "JWST", "jw01_nrca_cal.fits");
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let pass = |f: FiltersConfig| filters(f).refuses(&e).is_none();
        assert!(pass(FiltersConfig::default()));
        assert!(pass(FiltersConfig {
            event_type: v(&["public", "new"]),
            ..Default::default()
        }));
        assert!(!pass(FiltersConfig {
            event_type: v(&["Public"]),
            ..Default::default()
        }));
        assert!(!pass(FiltersConfig {
            event_type: v(&["!New"]),
            ..Default::default()
        }));
        assert!(pass(FiltersConfig {
            mission: v(&["jwst"]),
            ..Default::default()
        }));
        assert!(!pass(FiltersConfig {
            mission: v(&["!JWST"]),
            ..Default::default()
        }));
        for (rule, ok) in [
            ("1500", true),
            (">1000", true),
            (">1500", false),
            (">=1500", true),
            ("<=2000", true),
            ("<1500", false),
            ("1000..2000", true),
            ("1501..2000", false),
            ("!1000..2000", false),
        ] {
            assert_eq!(
                pass(FiltersConfig {
                    program: v(&[rule]),
                    ..Default::default()
                }),
                ok,
                "{rule}"
            );
        }
        assert!(pass(FiltersConfig {
            program: v(&["5", "1400..1600"]),
            ..Default::default()
        }));
        assert!(pass(FiltersConfig {
            filename: v(&["*_cal.fits"]),
            ..Default::default()
        }));
        assert!(!pass(FiltersConfig {
            filename: v(&["*_cal.fits", "!*nrca*"]),
            ..Default::default()
        }));
        let why = filters(FiltersConfig {
            program: v(&["<1000"]),
            ..Default::default()
        })
        .refuses(&e)
        .unwrap();
        assert_eq!(why, "filtered out: program 1500 is not <1000");
    }

    #[test]
    fn bad_rules_are_refused_with_the_field_and_value() {
        for (f, needle) in [
            (
                FiltersConfig {
                    program: vec!["abc".into()],
                    ..Default::default()
                },
                "filter program = \"abc\"",
            ),
            (
                FiltersConfig {
                    program: vec!["9..3".into()],
                    ..Default::default()
                },
                "empty",
            ),
            (
                FiltersConfig {
                    event_type: vec!["Old".into()],
                    ..Default::default()
                },
                "expected New",
            ),
            (
                FiltersConfig {
                    filename: vec!["[".into()],
                    ..Default::default()
                },
                "filter filename",
            ),
        ] {
            let e = Filters::new(&f).unwrap_err();
            assert!(e.contains(needle), "{e}");
        }
    }
}
