"""The audit trail: who (which key) did what admin action to which target, and when."""
