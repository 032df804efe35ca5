"""nbdsnap server side: the nbd-server hooks, sessions and the libvirt boundary."""
