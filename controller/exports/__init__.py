"""Compliance exports: the register as of a date, the pool-compliance report for a period and
the audit log, as CSV / XLSX / PDF (and JSON for the log), each in a folder with a signed
manifest that ``asicfleet verify-export`` checks offline. See docs/exports.md."""
