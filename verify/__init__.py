"""nbd-verify: prove that a copy of a disk image equals the frozen base."""
