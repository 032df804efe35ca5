"""nbdsnap.hooks.agent: what a guest-ping's failure says."""

import libvirt
import pytest

from nbdsnap.hooks import agent


class Dom:
    def name(self):
        return "dom1"


def failing(error):
    def call(dom, command, timeout):
        raise error
    return call


def test_an_answer_is_no_silence(monkeypatch):
    monkeypatch.setattr(agent, "_call", lambda dom, cmd, timeout: "{}")
    assert agent.silence(Dom(), 5) is None
    assert agent.answers(Dom(), 5)


def test_silence_is_said_in_libvirt_s_words(monkeypatch):
    error = libvirt.libvirtError("x")
    error.err = (libvirt.VIR_ERR_AGENT_UNRESPONSIVE, 0,
                 "Guest agent is not responding: QEMU guest agent is not "
                 "connected", 2, None, None, None, 0, 0)
    monkeypatch.setattr(agent, "_call", failing(error))
    assert "not connected" in agent.silence(Dom(), 5)
    assert not agent.answers(Dom(), 5)


def test_an_error_with_no_message_is_still_silence(monkeypatch):
    """libvirt may raise with no error record: never read as an answer."""
    error = libvirt.libvirtError("")
    error.err = None
    monkeypatch.setattr(agent, "_call", failing(error))
    assert agent.silence(Dom(), 5)
    assert not agent.answers(Dom(), 5)


def test_no_channel_is_said_at_once(monkeypatch):
    error = libvirt.libvirtError("x")
    error.err = (libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED, 0,
                 "QEMU guest agent is not configured", 2, None, None, None,
                 0, 0)
    monkeypatch.setattr(agent, "_call", failing(error))
    with pytest.raises(agent.NoChannel, match="no guest agent channel"):
        agent.silence(Dom(), 5)
