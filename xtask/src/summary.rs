//! Reading libtest / libtest-mimic output: result lines, ignored and failed tests.

/// Counts from one or more `test result:` lines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

impl Tally {
    pub fn add(&mut self, other: Tally) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.ignored += other.ignored;
    }
}

/// One test line's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TestLine {
    /// `test NAME ... ignored[, reason | (reason)]`
    Ignored { name: String, reason: Option<String> },
    /// `test NAME ... FAILED`
    Failed { name: String },
}

/// Parses `test result: ok. 3 passed; 1 failed; 2 ignored; 0 measured; 0 filtered out; ...`.
pub fn parse_result_line(line: &str) -> Option<Tally> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let (_, counts) = rest.split_once(". ")?;
    let mut tally = Tally::default();
    let mut seen = false;
    for part in counts.split(';') {
        let mut words = part.split_whitespace();
        let (Some(n), Some(what)) = (words.next(), words.next()) else { continue };
        let Ok(n) = n.parse::<u64>() else { continue };
        match what {
            "passed" => tally.passed = n,
            "failed" => tally.failed = n,
            "ignored" => tally.ignored = n,
            _ => continue,
        }
        seen = true;
    }
    seen.then_some(tally)
}

/// Parses a per-test line that reports an ignored or failed test.
pub fn parse_test_line(line: &str) -> Option<TestLine> {
    let rest = line.strip_prefix("test ")?;
    let (name, outcome) = rest.split_once(" ... ")?;
    let name = name.trim().to_owned();
    let outcome = outcome.trim();
    if outcome == "FAILED" {
        return Some(TestLine::Failed { name });
    }
    let after = outcome.strip_prefix("ignored")?;
    let reason = if let Some(r) = after.strip_prefix(", ") {
        Some(r.trim().to_owned())
    } else if let Some(r) = after.trim().strip_prefix('(').and_then(|r| r.strip_suffix(')')) {
        Some(r.trim().to_owned())
    } else if after.trim().is_empty() {
        None
    } else {
        return None;
    };
    Some(TestLine::Ignored { name, reason: reason.filter(|r| !r.is_empty()) })
}

/// The final line: `N passed, N failed` plus `, N skipped` when something was skipped.
pub fn summary_line(passed: u64, failed: u64, skipped: u64) -> String {
    if skipped > 0 {
        format!("{passed} passed, {failed} failed, {skipped} skipped")
    } else {
        format!("{passed} passed, {failed} failed")
    }
}

/// The `---- NAME stdout ----` (libtest) or `---- NAME ----` (libtest-mimic) sections of a run:
/// what each failed test printed. Fed line by line; a section ends at the next header, at the
/// `failures:` list that follows the sections, or at the result line.
#[derive(Debug, Default)]
pub struct FailureSections {
    done: Vec<(String, Vec<String>)>,
    open: Option<(String, Vec<String>)>,
}

impl FailureSections {
    pub fn feed(&mut self, line: &str) {
        if let Some(name) = section_header(line) {
            self.close();
            self.open = Some((name, Vec::new()));
        } else if line.trim_end() == "failures:" || parse_result_line(line).is_some() {
            self.close();
        } else if let Some((_, lines)) = &mut self.open {
            lines.push(line.to_owned());
        }
    }

    fn close(&mut self) {
        if let Some(section) = self.open.take() {
            self.done.push(section);
        }
    }

    /// Every section read, each cut to its first `head` and last `tail` lines: the start says
    /// what failed, the end why (a VM error ends with the console's last lines).
    pub fn finish(mut self, head: usize, tail: usize) -> Vec<(String, Vec<String>)> {
        self.close();
        for (_, lines) in &mut self.done {
            while lines.last().is_some_and(|l| l.trim().is_empty()) {
                lines.pop();
            }
            if lines.len() > head + tail {
                let cut = lines.len() - head - tail;
                lines.splice(head..head + cut, [format!("[... {cut} lines ...]")]);
            }
        }
        self.done
    }
}

fn section_header(line: &str) -> Option<String> {
    let inner = line.strip_prefix("---- ")?.strip_suffix(" ----")?;
    let name = inner.strip_suffix(" stdout").unwrap_or(inner).trim();
    (!name.is_empty() && !name.contains(" ---- ")).then(|| name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtest_result_lines_are_counted() {
        let t = parse_result_line(
            "test result: ok. 15 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out; \
             finished in 0.00s",
        );
        assert_eq!(t, Some(Tally { passed: 15, failed: 0, ignored: 2 }));
        let t = parse_result_line("test result: FAILED. 3 passed; 1 failed; 0 ignored; 0 measured");
        assert_eq!(t, Some(Tally { passed: 3, failed: 1, ignored: 0 }));
        assert_eq!(parse_result_line("running 4 tests"), None);
        assert_eq!(parse_result_line("test result: garbage"), None);
    }

    #[test]
    fn ignored_lines_keep_their_reason() {
        assert_eq!(
            parse_test_line(
                "test power_cut   ... ignored (needs the virtual device: run cargo xtask test)"
            ),
            Some(TestLine::Ignored {
                name: "power_cut".into(),
                reason: Some("needs the virtual device: run cargo xtask test".into())
            })
        );
        assert_eq!(
            parse_test_line("test a::b ... ignored, needs dm-bow (Android kernels only)"),
            Some(TestLine::Ignored {
                name: "a::b".into(),
                reason: Some("needs dm-bow (Android kernels only)".into())
            })
        );
        assert_eq!(
            parse_test_line("test src/lib.rs - f (line 3) ... ignored"),
            Some(TestLine::Ignored { name: "src/lib.rs - f (line 3)".into(), reason: None })
        );
    }

    #[test]
    fn failed_and_passed_lines() {
        assert_eq!(
            parse_test_line("test x::y ... FAILED"),
            Some(TestLine::Failed { name: "x::y".into() })
        );
        assert_eq!(parse_test_line("test x ... ok"), None);
        assert_eq!(parse_test_line("test result: ok. 1 passed; 0 failed"), None);
    }

    #[test]
    fn summary_mentions_skipped_only_when_there_are_some() {
        assert_eq!(summary_line(3, 0, 0), "3 passed, 0 failed");
        assert_eq!(summary_line(3, 1, 2), "3 passed, 1 failed, 2 skipped");
    }

    #[test]
    fn failure_sections_keep_each_failed_tests_output_tail() {
        let out = "running 2 tests\ntest a ... FAILED\ntest b ... FAILED\n\nfailures:\n\n\
                   ---- a stdout ----\nline 1\nline 2\nline 3\n\n\
                   ---- b ----\nVM `b`: expected exit status 0, got TimedOut\n\n\
                   failures:\n    a\n    b\n\ntest result: FAILED. 0 passed; 2 failed; 0 ignored";
        let mut sections = FailureSections::default();
        for line in out.lines() {
            sections.feed(line);
        }
        let got = sections.finish(1, 1);
        assert_eq!(
            got,
            vec![
                (
                    "a".to_owned(),
                    vec!["line 1".to_owned(), "[... 1 lines ...]".to_owned(), "line 3".to_owned()]
                ),
                ("b".to_owned(), vec!["VM `b`: expected exit status 0, got TimedOut".to_owned()]),
            ]
        );
        let mut none = FailureSections::default();
        none.feed("---- not a header");
        none.feed("test result: ok. 1 passed; 0 failed; 0 ignored");
        assert!(none.finish(5, 5).is_empty());
    }
}
