"""ansible-playbook as an operator runs it, and what its PLAY RECAP says.

For the test of the Ansible roles (contrib/ansible): Debian's ansible-core,
connection local, everything Ansible writes (its temporary files, no
retry files) kept in the test's folder.
"""

import json
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SITE = os.path.join(ROOT, "contrib", "ansible", "site.yml")

_RECAP = re.compile(r"^(\S+)\s+:\s+((?:\w+=\d+\s*)+)$", re.MULTILINE)


def recap(output):
    """{host: {"ok": N, "changed": N, "failed": N, ...}} from the PLAY
    RECAP at the end of ansible-playbook's output; ValueError without one.

    >>> recap("PLAY RECAP ***\\nlocalhost : ok=3 changed=1 failed=0\\n")
    {'localhost': {'ok': 3, 'changed': 1, 'failed': 0}}
    """
    _, found, tail = output.rpartition("PLAY RECAP")
    if not found:
        raise ValueError("no PLAY RECAP in ansible-playbook's output")
    hosts = {}
    for host, counts in _RECAP.findall(tail):
        hosts[host] = {k: int(v) for k, v in
                       (pair.split("=") for pair in counts.split())}
    if not hosts:
        raise ValueError("a PLAY RECAP without hosts")
    return hosts


class Run:
    """One ansible-playbook run: its exit status, output and recap."""

    def __init__(self, proc):
        self.returncode = proc.returncode
        self.output = proc.stdout + proc.stderr
        try:
            self.recap = recap(proc.stdout)
        except ValueError:
            self.recap = {}

    def total(self, what):
        return sum(counts.get(what, 0) for counts in self.recap.values())

    def changed_tasks(self):
        """The output of the tasks that changed something (with --diff,
        what they changed), to say why a run was not idempotent."""
        blocks, block = [], []
        for line in self.output.splitlines():
            if line.startswith(("TASK [", "RUNNING HANDLER [", "PLAY ")):
                if any(b.startswith("changed:") for b in block):
                    blocks.append("\n".join(block))
                block = []
            block.append(line)
        return "\n".join(blocks)


def run(folder, inventory, extra_vars, playbook=SITE, check=False,
        timeout=600):
    """ansible-playbook -i inventory playbook, with extra_vars (JSON,
    so that lists and dicts keep their types), from folder."""
    tmp = os.path.join(folder, "ansible-tmp")
    os.makedirs(tmp, exist_ok=True)
    # Ansible reads ./ansible.cfg first: this one, not the host's.
    with open(os.path.join(folder, "ansible.cfg"), "w") as f:
        f.write("[defaults]\n")
    env = dict(os.environ, ANSIBLE_LOCAL_TEMP=tmp, ANSIBLE_REMOTE_TEMP=tmp,
               ANSIBLE_RETRY_FILES_ENABLED="0", ANSIBLE_NOCOLOR="1",
               ANSIBLE_STDOUT_CALLBACK="default",
               ANSIBLE_HOST_KEY_CHECKING="0",
               DEBIAN_FRONTEND="noninteractive")
    cmd = ["ansible-playbook", "--diff", "-i", inventory, "-e",
           json.dumps(extra_vars), playbook]
    if check:
        cmd.append("--check")
    return Run(subprocess.run(cmd, cwd=folder, env=env, capture_output=True,
                              text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL))
