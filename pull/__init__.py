"""nbd-pull: the clone host's refresh of copies from frozen exports."""
