//! Delivery reports, queued for the flush cycle. The producer calls back
//! inside `poll`, where the processor is already borrowed, so reports are
//! queued here and the pod hands them to `tally_core::cycle::Cycle` after each
//! poll. Each record's opaque is its `Tag` (batch, lane, index): a report
//! of a batch that is gone is recognised by the cycle, never credited to
//! another batch.

use super::*;

/// One delivery report.
#[derive(Clone, Copy, Debug)]
pub(super) struct Report {
    pub(super) tag: Tag,
    pub(super) ok: bool,
    /// Where a changelog record landed (for the checkpoint).
    pub(super) landed: Option<(Partition, i64)>,
}

/// The producer's context: queues delivery reports.
pub struct AckContext {
    pub(super) changelog_topic: String,
    pub(super) reports: Mutex<Vec<Report>>,
}

impl AckContext {
    pub(super) fn new(changelog_topic: String) -> AckContext {
        AckContext {
            changelog_topic,
            reports: Mutex::new(Vec::new()),
        }
    }

    /// The reports queued since the last call.
    pub(super) fn take(&self, into: &mut Vec<Report>) {
        let mut q = self.reports.lock().unwrap_or_else(|e| e.into_inner());
        into.append(&mut q);
    }
}

impl ClientContext for AckContext {}

impl ProducerContext for AckContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: usize) {
        let tag = Tag::from_opaque(opaque);
        let report = match result {
            Err((e, m)) => {
                warn!(error = %e, topic = m.topic(), partition = m.partition(), "an output was not delivered; it will be sent again");
                Report {
                    tag,
                    ok: false,
                    landed: None,
                }
            }
            Ok(m) => Report {
                tag,
                ok: true,
                landed: (m.topic() == self.changelog_topic).then(|| (m.partition(), m.offset())),
            },
        };
        self.reports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(report);
    }
}
