"""Base: OS as profiled, base packages, apt settings, no reboot pending."""

from __future__ import annotations

from gpunode.checks import expect
from gpunode.core import desired
from gpunode.facts import reboot_reasons


def test_os_matches_profile(node, facts):
    os_id, version = node.os.split("-", 1)
    actual = facts.snap.data["os"]
    assert (actual["id"], actual["version_id"]) == (os_id, version), (
        f"OS differs: expected {node.os}, host has {actual['id']}-{actual['version_id']}")


def test_base_packages_installed(node, facts):
    missing = [name for name in desired.base_packages(node) if name not in facts.packages]
    assert not missing, f"base packages not installed: {missing}"


def test_no_reboot_pending(node, facts):
    reasons = reboot_reasons(node, facts.snap)
    assert not reasons, expect.explain("the host needs a reboot", reasons)


def test_base_files_match(node, facts):
    problems = facts.file_problems("base")
    assert not problems, expect.explain("base files differ from the profile", problems)
