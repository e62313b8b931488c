# Runs ON THE CHECKED HOST (python3 >= 3.10, stdlib only) and prints one JSON document:
# what the testinfra checks need beyond gpunode.facts' snapshot, read in one command.
# Input: argv[1] = JSON spec (see checks/conftest.py). Output never contains a secret: API
# keys and the Hugging Face token are read here only to search for them, and only where
# they were found leaves the host.
import glob
import json
import os
import stat
import subprocess
import sys
import urllib.error
import urllib.request

MAX_TEXT = 65536


def run(cmd, timeout=60, shell=False):
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, shell=shell,
                           errors="replace")
        return {"rc": p.returncode, "out": p.stdout, "err": p.stderr[-4000:]}
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"rc": 127, "out": "", "err": str(exc)}


def read(path, limit=MAX_TEXT):
    try:
        with open(path, errors="replace") as f:
            return f.read(limit)
    except OSError:
        return None


def read_bytes(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def is_char_device(path):
    try:
        return stat.S_ISCHR(os.stat(path).st_mode)
    except OSError:
        return None  # absent


def unit_props(units, props):
    out = {}
    if not units:
        return out
    res = run(["systemctl", "show", "--no-pager", "-p", ",".join(["Id"] + props)] + units)
    blocks = res["out"].split("\n\n")
    for unit, block in zip(units, blocks, strict=False):
        out[unit] = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
    return out


def cgroup_pids(cgroup):
    pids = []
    if not cgroup:
        return pids
    base = "/sys/fs/cgroup" + cgroup
    for dirpath, _dirs, files in os.walk(base):
        if "cgroup.procs" in files:
            text = read(os.path.join(dirpath, "cgroup.procs")) or ""
            pids += [int(x) for x in text.split()]
    return sorted(set(pids))


def status_field(pid, name):
    for line in (read(f"/proc/{pid}/status") or "").splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    return None


def policy_counts(pid):
    counts = {}
    text = read(f"/proc/{pid}/numa_maps", limit=16 * 1024 * 1024) or ""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            counts[parts[1]] = counts.get(parts[1], 0) + 1
    return counts


def http(method, url, key=None, body=None, timeout=30):
    headers = {"Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if key:
        headers["Authorization"] = "Bearer " + key
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return {"status": resp.status, "body": resp.read(MAX_TEXT).decode("utf-8", "replace")}
    except urllib.error.HTTPError as exc:
        return {"status": exc.code, "body": exc.read(4096).decode("utf-8", "replace")}
    except (OSError, ValueError) as exc:
        return {"status": None, "error": str(exc)}


def base_url(address, port):
    if ":" in address:
        address = "[" + address + "]"
    return f"http://{address}:{port}"


def secret_exposure(out, prefix, path, units, cmdlines, scan_paths):
    """Read a secret file only to look for its content where it must never be: process
    command lines, unit files, managed files, the units' journals. Sets <prefix>_read,
    _stat and _found_in in out (no secret leaves) and returns the secret for local use."""
    secret = None
    if path:
        raw = read_bytes(path)
        secret = raw.decode("utf-8", "replace").strip() if raw else None
    out.update({f"{prefix}_read": bool(secret), f"{prefix}_found_in": [], f"{prefix}_stat": None})
    if path:
        try:
            st = os.stat(path)
            out[f"{prefix}_stat"] = {"mode": f"{st.st_mode & 0o7777:04o}", "uid": st.st_uid}
        except OSError:
            pass
    if not secret:
        return None
    found = out[f"{prefix}_found_in"]
    found += [where for where, cmdline in cmdlines.items() if secret.encode() in cmdline]
    for unit in units:
        if secret in run(["systemctl", "cat", "--no-pager", unit])["out"]:
            found.append(f"unit files (systemctl cat {unit})")
    for scan in scan_paths:
        text = read(scan, limit=16 * 1024 * 1024)
        if text and secret in text:
            found.append(scan)
    for unit in units:
        journal = run(["journalctl", "-u", unit, "--no-pager", "-o", "cat"], timeout=120)
        if secret in journal["out"]:
            found.append(f"journal (journalctl -u {unit})")
    return secret


def probe_service(svc, timeout):
    unit = svc["unit"]
    props = unit_props([unit], ["MainPID", "ControlGroup", "ActiveState", "SubState"]).get(unit, {})
    main = int(props.get("MainPID") or 0)
    pids = cgroup_pids(props.get("ControlGroup"))
    if main and main not in pids:
        pids.insert(0, main)
    out = {"main_pid": main, "pids": {}}
    cmdlines = {}
    for pid in pids:
        cmdline = read_bytes(f"/proc/{pid}/cmdline")
        if cmdline is None:
            continue
        info = {
            "comm": (read(f"/proc/{pid}/comm") or "").strip(),
            "cpus": status_field(pid, "Cpus_allowed_list"),
            "policies": policy_counts(pid),
        }
        out["pids"][str(pid)] = info
        cmdlines[f"/proc/{pid}/cmdline ({info['comm']})"] = cmdline
    key = secret_exposure(out, "key", svc.get("key_path"), [unit], cmdlines,
                          svc.get("scan_paths", []))
    secret_exposure(out, "token", svc.get("token_path"), svc.get("token_units", [unit]),
                    cmdlines, svc.get("scan_paths", []))
    sec = run(["systemd-analyze", "security", "--no-pager", unit])
    out["security"] = {"rc": sec["rc"], "out": sec["out"][-2000:], "err": sec["err"][-1000:]}
    url = base_url(svc["address"], svc["port"])
    out["health"] = http("GET", url + "/health", timeout=timeout)
    out["models_nokey"] = http("GET", url + "/v1/models", timeout=timeout)
    if key:
        out["models_key"] = http("GET", url + "/v1/models", key=key, timeout=timeout)
    else:
        out["models_key"] = out["models_nokey"]
    if svc.get("served"):
        body = {"model": svc["served"][0], "prompt": "Say hello.", "max_tokens": 8,
                "temperature": 0}
        out["completion"] = http("POST", url + "/v1/completions", key=key, body=body,
                                 timeout=timeout)
    return out


def main():
    spec = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    out = {"contents": {p: read(p) for p in spec.get("contents", [])}}
    out["units"] = unit_props(spec.get("units", []), spec.get("unit_props", []))
    out["cmds"] = {k: run(c, timeout=120, shell=True) for k, c in spec.get("commands", {}).items()}
    mtimes = {}
    for pattern in spec.get("mtimes", []):
        for path in glob.glob(pattern):
            try:
                mtimes[path] = os.stat(path).st_mtime
            except OSError:
                pass
    out["mtimes"] = mtimes
    out["char_devices"] = {p: is_char_device(p) for p in spec.get("char_devices", [])}
    out["cpus_online"] = (read("/sys/devices/system/cpu/online") or "").strip()
    out["numa_nodes_online"] = (read("/sys/devices/system/node/online") or "").strip()
    if spec.get("listeners"):
        out["listeners"] = run(["ss", "-Htlnp"])
    out["services"] = {s["name"]: probe_service(s, spec.get("http_timeout", 30))
                       for s in spec.get("services", [])}
    json.dump(out, sys.stdout, sort_keys=True)


if __name__ == "__main__":
    main()
