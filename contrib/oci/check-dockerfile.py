#!/usr/bin/env python3
"""Checks that the Dockerfile and the OCI image of contrib/oci/build.sh agree.

    contrib/oci/check-dockerfile.py LAYOUT [DOCKERFILE]

The Dockerfile's last stage (FROM gcr.io/distroless/cc-debian12:nonroot) and
the image in LAYOUT (tag latest) must give the same user, working directory,
environment, entrypoint, command and title label, and put the same binaries
in the same directory; the image's /etc/passwd must name that user nonroot
with that home. build.sh runs it last. Standard library only: no Docker.
"""
import gzip
import json
import pathlib
import posixpath
import shlex
import sys
import tarfile


def dockerfile_stage(path):
    """The instructions of the last stage, continuation lines joined."""
    lines, current = [], ""
    for raw in pathlib.Path(path).read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        lines.append(current)
        current = ""
    stage = []
    for line in lines:
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            stage = []
        stage.append((word.upper(), rest.strip()))
    return stage


def pairs(text):
    """ENV and LABEL arguments: KEY=VALUE ..."""
    out = {}
    for item in shlex.split(text):
        key, sep, value = item.partition("=")
        if not sep:
            sys.exit(f"check-dockerfile: only KEY=VALUE forms are read: {text}")
        out[key] = value
    return out


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    layout = pathlib.Path(sys.argv[1])
    dockerfile = sys.argv[2] if len(sys.argv) == 3 else pathlib.Path(__file__).resolve().parents[2] / "Dockerfile"

    want = {"User": None, "WorkingDir": None, "Env": {}, "Labels": {}, "Entrypoint": None, "Cmd": None}
    binaries, bindir, base = [], None, None
    for word, rest in dockerfile_stage(dockerfile):
        if word == "FROM":
            base = rest
        elif word == "USER":
            want["User"] = rest
        elif word == "WORKDIR":
            want["WorkingDir"] = rest
        elif word == "ENV":
            want["Env"].update(pairs(rest))
        elif word == "LABEL":
            want["Labels"].update(pairs(rest))
        elif word == "ENTRYPOINT":
            want["Entrypoint"] = json.loads(rest) or None
        elif word == "CMD":
            want["Cmd"] = json.loads(rest)
        elif word == "COPY":
            args = [a for a in rest.split() if not a.startswith("--")]
            bindir = args[-1].rstrip("/")
            binaries += [pathlib.PurePosixPath(a).name for a in args[:-1]]
    if base != "gcr.io/distroless/cc-debian12:nonroot":
        sys.exit(f"check-dockerfile: the Dockerfile's base is {base}, not the one contrib/oci/build.sh copies")

    blob = lambda digest: layout / "blobs" / digest.replace(":", "/")
    index = json.loads((layout / "index.json").read_text())
    ref = [m for m in index["manifests"] if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == "latest"]
    manifest = json.loads(blob(ref[0]["digest"]).read_text())
    config = json.loads(blob(manifest["config"]["digest"]).read_text())["config"]

    errors = []
    got_env = dict(e.split("=", 1) for e in config.get("Env", []))
    for key in ("User", "WorkingDir", "Entrypoint", "Cmd"):
        if (config.get(key) or None) != want[key]:
            errors.append(f"{key}: Dockerfile {want[key]!r}, image {config.get(key)!r}")
    if got_env != want["Env"]:
        errors.append(f"Env: Dockerfile {want['Env']}, image {got_env}")
    for key, value in want["Labels"].items():
        if config.get("Labels", {}).get(key) != value:
            errors.append(f"label {key}: Dockerfile {value!r}, image {config.get('Labels', {}).get(key)!r}")

    files = {}
    for layer in manifest["layers"]:
        with tarfile.open(fileobj=gzip.open(blob(layer["digest"]))) as tar:
            for member in tar:
                name = posixpath.normpath("/" + member.name)
                files[name] = member
                if name == "/etc/passwd":
                    passwd = tar.extractfile(member).read().decode()
    for b in binaries:
        m = files.get(f"{bindir}/{b}")
        if m is None or not m.isfile() or m.mode & 0o755 != 0o755:
            errors.append(f"{bindir}/{b}: not an executable file in the image")
    extra = sorted(n for n in files if n.startswith(bindir + "/") and files[n].isfile() and n.rsplit("/", 1)[1] not in binaries)
    if extra:
        errors.append(f"in the image but not in the Dockerfile: {extra}")
    uid, _, gid = want["User"].partition(":")
    entry = f"nonroot:x:{uid}:{gid or uid}:nonroot:{want['WorkingDir']}:/sbin/nologin"
    if entry not in passwd.splitlines():
        errors.append(f"/etc/passwd has no line {entry}")
    home = files.get(want["WorkingDir"])
    if home is None or not home.isdir() or (str(home.uid), str(home.gid)) != (uid, gid or uid):
        errors.append(f"{want['WorkingDir']}: not a directory of {want['User']} in the image")

    if errors:
        print("check-dockerfile: the Dockerfile and the OCI image differ:", *errors, sep="\n  ", file=sys.stderr)
        sys.exit(1)
    print(f"check-dockerfile: the Dockerfile and {layout} agree (user {want['User']}, {want['WorkingDir']}, "
          f"{bindir}/{{{','.join(binaries)}}}, cmd {want['Cmd']})", file=sys.stderr)


if __name__ == "__main__":
    main()
