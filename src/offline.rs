//! `neurostream process`: the per-partition processor over JSON lines (or an Avro object
//! container file), offline.
//!
//! Each input line is an event (DESIGN.md shape) at offset = its 0-based line number; each output
//! is one JSON line. At end of input every open window closes and emits its final. Bad lines are
//! reported (line number and reason) and skipped.

use std::io::{BufRead, Write};

use crate::config::Config;
use crate::processor::{Processor, Record};

/// By default window updates (`emit = update|both`) are coalesced over this many lines, the
/// offline counterpart of the service's processing batch.
pub const UPDATE_BATCH_LINES: u64 = 1_000;

/// Counts of an offline run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OfflineStats {
    /// Lines read.
    pub lines: u64,
    /// Lines rejected.
    pub rejected: u64,
    /// Output lines written.
    pub outputs: u64,
}

/// How an offline run reports.
#[derive(Debug, Clone, Copy)]
pub struct OfflineOptions {
    /// Window updates (`emit = update|both`) are coalesced over this many lines.
    pub update_every: u64,
    /// Add one `assignment` line per clustered event, in input order.
    pub assignments: bool,
}

impl Default for OfflineOptions {
    fn default() -> Self {
        Self {
            update_every: UPDATE_BATCH_LINES,
            assignments: false,
        }
    }
}

/// Processes every line of `input`, writing outputs to `output` and rejections to `errors`.
///
/// # Errors
/// I/O errors of the reader or writers.
pub fn process_lines(
    config: &Config,
    options: OfflineOptions,
    input: impl BufRead,
    output: impl Write,
    errors: impl Write,
) -> std::io::Result<OfflineStats> {
    let mut run = Run::new(config, options, output, errors);
    for (n, line) in input.split(b'\n').enumerate() {
        let mut line = line?;
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        run.record(n, &line)?;
    }
    run.finish()
}

/// Processes every record of an Avro object container file (its embedded writer schema resolved
/// against the event schema, as for `avro-raw` input); offset = the record's 0-based position.
///
/// # Errors
/// I/O errors, a file that is not an Avro container, or a writer schema that cannot be read as
/// an event.
pub fn process_avro_container(
    config: &Config,
    options: OfflineOptions,
    input: impl std::io::Read,
    output: impl Write,
    errors: impl Write,
) -> std::io::Result<OfflineStats> {
    use std::io::{Error, ErrorKind};
    let reader = apache_avro::Reader::new(input).map_err(|e| {
        Error::new(
            ErrorKind::InvalidData,
            format!("not an Avro container file: {e}"),
        )
    })?;
    let schema = reader.writer_schema().clone();
    let plan = crate::avro::WriterPlan::from_schema(&schema)
        .map_err(|e| Error::new(ErrorKind::InvalidData, e.to_string()))?;
    let mut run = Run::new(config, options, output, errors);
    run.processor
        .set_input(crate::avro::InputDecoder::AvroRaw(std::sync::Arc::new(Ok(
            plan,
        ))));
    for (n, value) in reader.enumerate() {
        // NB: the reader yields values; the plan reads datums (the service's path).
        let datum = value
            .and_then(|v| apache_avro::to_avro_datum(&schema, v))
            .map_err(|e| Error::new(ErrorKind::InvalidData, format!("record {n}: {e}")))?;
        run.record(n, &datum)?;
    }
    run.finish()
}

/// One offline run: the processor, its pending outputs and the writers.
struct Run<O: Write, E: Write> {
    processor: Processor,
    update_every: u64,
    stats: OfflineStats,
    out: Vec<crate::output::Emitted>,
    output: O,
    errors: E,
}

impl<O: Write, E: Write> Run<O, E> {
    fn new(config: &Config, options: OfflineOptions, output: O, errors: E) -> Self {
        let mut processor = Processor::new(&config.processing, config.kafka.max_event_bytes, 0);
        processor.collect_assignments(options.assignments);
        Self {
            processor,
            update_every: options.update_every,
            stats: OfflineStats::default(),
            out: Vec::new(),
            output,
            errors,
        }
    }

    /// Processes the record at position `n` (0-based; reported 1-based).
    fn record(&mut self, n: usize, payload: &[u8]) -> std::io::Result<()> {
        self.stats.lines += 1;
        let record = Record {
            payload: Some(payload),
            key: None,
            timestamp_ms: None,
            offset: n as i64,
        };
        match self.processor.process(record, &mut self.out) {
            Ok(Some(late)) => writeln!(
                self.errors,
                "line {}: late: {} ms behind stream time",
                n + 1,
                late.behind_ms
            )?,
            Ok(None) => {}
            Err(err) => {
                self.stats.rejected += 1;
                writeln!(self.errors, "line {}: {}: {err}", n + 1, err.kind())?;
            }
        }
        if self.stats.lines % self.update_every.max(1) == 0 {
            self.processor.end_batch(&mut self.out);
        }
        write_assignments(&mut self.output, &mut self.processor)?;
        self.stats.outputs += write_outputs(&mut self.output, &mut self.out)?;
        Ok(())
    }

    fn finish(mut self) -> std::io::Result<OfflineStats> {
        self.processor.close_all(&mut self.out);
        write_assignments(&mut self.output, &mut self.processor)?;
        self.stats.outputs += write_outputs(&mut self.output, &mut self.out)?;
        self.output.flush()?;
        Ok(self.stats)
    }
}

fn write_assignments(output: &mut impl Write, processor: &mut Processor) -> std::io::Result<()> {
    for line in processor.drain_assignments() {
        serde_json::to_writer(&mut *output, &line)?;
        output.write_all(b"\n")?;
    }
    Ok(())
}

fn write_outputs(
    output: &mut impl Write,
    out: &mut Vec<crate::output::Emitted>,
) -> std::io::Result<u64> {
    let n = out.len() as u64;
    for emitted in out.drain(..) {
        output.write_all(&emitted.output.to_json())?;
        output.write_all(b"\n")?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_close_at_end_of_input_and_bad_lines_are_reported() {
        let mut config = Config::default();
        config.processing.clustering.enabled = false;
        config.processing.windows[0].size_ms = 10;
        let input = "{\"key\":\"a\",\"ts\":1,\"value\":2}\nnot json\n{\"key\":\"a\",\"ts\":12,\"value\":4}\n";
        let mut out = Vec::new();
        let mut err = Vec::new();
        let stats = process_lines(
            &config,
            OfflineOptions::default(),
            input.as_bytes(),
            &mut out,
            &mut err,
        )
        .unwrap();
        assert_eq!(
            stats,
            OfflineStats {
                lines: 3,
                rejected: 1,
                outputs: 2
            }
        );
        let err = String::from_utf8(err).unwrap();
        assert!(err.starts_with("line 2: not_json:"), "{err}");
        let lines: Vec<serde_json::Value> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0]["type"], "window_aggregate");
        assert_eq!(lines[0]["window_start"], 0);
        assert_eq!(lines[0]["sum"], 2.0);
        assert_eq!(lines[1]["window_start"], 10);
        assert_eq!(lines[1]["final"], true);
    }
}
