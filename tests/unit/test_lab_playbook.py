"""lab.playbook.recap: the PLAY RECAP the Ansible roles' test reads."""

import pytest

from lab import playbook

OUTPUT = """\
PLAY [VM hosts] ****************************************************************

TASK [nbdsnap_vmhost : Write nbdsnap's configuration] **************************
changed: [localhost]

PLAY RECAP *********************************************************************
localhost                  : ok=39   changed=0    unreachable=0    failed=0    skipped=9    rescued=0    ignored=0
vmhost1.example            : ok=2    changed=1    unreachable=0    failed=1    skipped=0    rescued=0    ignored=0

"""


def test_recap_counts_each_host():
    found = playbook.recap(OUTPUT)
    assert found["localhost"] == {"ok": 39, "changed": 0, "unreachable": 0,
                                  "failed": 0, "skipped": 9, "rescued": 0,
                                  "ignored": 0}
    assert found["vmhost1.example"]["failed"] == 1


def test_no_recap_is_an_error_not_zero_changes():
    with pytest.raises(ValueError, match="no PLAY RECAP"):
        playbook.recap("ERROR! the playbook could not be read\n")
    with pytest.raises(ValueError, match="without hosts"):
        playbook.recap("PLAY RECAP ****\n\n")


def test_changed_tasks_name_what_changed():
    class Proc:
        returncode, stdout, stderr = 0, OUTPUT, ""
    run = playbook.Run(Proc)
    assert run.total("changed") == 1 and run.total("failed") == 1
    assert "Write nbdsnap's configuration" in run.changed_tasks()
