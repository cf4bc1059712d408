#!/usr/bin/env bash
# gpubo on a real GPU, in one call: does it work there, and how fast?
#
#   bash benchmarks/gpu_check.sh [options] OUT_DIR
#
# Every output goes to OUT_DIR (created): the environment it found, `gpubo
# info`, the core and store tests run against the GPU (GPUBO_DEVICE=gpu, JUnit
# XML and logs), `gpubo bench --quick --json` for each transfer strategy and
# checksum placement this gpubo offers, and summary.json gathering them.
#
# Options:
#   --wheels DIR    install from the wheels in DIR only (no package index)
#   --python PY     use this interpreter as it is (nothing is installed)
#   --steps LIST    run only these steps, comma-separated, in this order:
#                   install,icd,info,tests,bench,summary (the default: all)
#   -h, --help      this text
#
# It assumes neither pyopencl nor a registered OpenCL ICD: without --python it
# makes a virtual environment under OUT_DIR and installs gpubo from this
# checkout with its test extras (and pyopencl) from the wheels or the index.
# If no ICD file under /etc/OpenCL/vendors names NVIDIA's library, it looks
# for libnvidia-opencl.so.1 (ldconfig's cache, then the usual folders, or the
# folders in GPUBO_CHECK_LIB_DIRS, colon-separated), writes an .icd file for
# it into OUT_DIR/icd and points OCL_ICD_VENDORS there. Each step has a time
# limit, so the whole run stays under 6 minutes on one GPU; a step that fails
# is recorded and the others still run. Exit status: 0 when every step ran
# and passed, 1 otherwise, 2 for bad arguments.
set -uo pipefail

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

repo=$(cd "$(dirname "$0")/.." && pwd)
wheels=""
python_bin=""
steps="install,icd,info,tests,bench,summary"
out=""
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) [ $# -ge 2 ] || { echo "gpu_check: --wheels needs a folder" >&2; exit 2; }; wheels=$2; shift 2 ;;
        --python) [ $# -ge 2 ] || { echo "gpu_check: --python needs an interpreter" >&2; exit 2; }; python_bin=$2; shift 2 ;;
        --steps) [ $# -ge 2 ] || { echo "gpu_check: --steps needs a list" >&2; exit 2; }; steps=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) [ -z "$out" ] || { echo "gpu_check: one OUT_DIR only" >&2; exit 2; }; out=$1; shift ;;
    esac
done
[ -n "$out" ] || { echo "gpu_check: give an output folder (see --help)" >&2; exit 2; }
[ -z "$wheels" ] || [ -d "$wheels" ] || { echo "gpu_check: --wheels $wheels is not a folder" >&2; exit 2; }
for step in ${steps//,/ }; do
    case "$step" in install|icd|info|tests|bench|summary) ;;
        *) echo "gpu_check: unknown step $step (install,icd,info,tests,bench,summary)" >&2; exit 2 ;;
    esac
done
mkdir -p "$out" || { echo "gpu_check: cannot create $out" >&2; exit 2; }
out=$(cd "$out" && pwd)
: > "$out/steps.tsv"   # step, exit status, seconds
failed=0

record() {  # record STEP STATUS START
    local now; now=$(date +%s)
    printf '%s\t%s\t%s\n' "$1" "$2" "$(( now - $3 ))" >> "$out/steps.tsv"
    [ "$2" = 0 ] || failed=1
}

py=${python_bin:-$out/venv/bin/python}  # the interpreter every later step uses

step_install() {
    if [ -n "$python_bin" ]; then
        echo "using $python_bin as it is" ; return 0
    fi
    python3 -m venv "$out/venv" || return 1
    local pip=("$out/venv/bin/python" -m pip install -q)
    if [ -n "$wheels" ]; then
        pip+=(--no-index --find-links "$wheels")
    fi
    "${pip[@]}" "$repo[test]" pyopencl
}

find_nvidia_lib() {
    local dirs=${GPUBO_CHECK_LIB_DIRS:-}
    if [ -z "$dirs" ]; then
        local cached
        cached=$(ldconfig -p 2>/dev/null | awk '/libnvidia-opencl\.so\.1/ {print $NF; exit}')
        if [ -n "$cached" ] && [ -e "$cached" ]; then echo "$cached"; return 0; fi
        dirs=/usr/lib/x86_64-linux-gnu:/usr/lib64:/usr/lib:/usr/local/nvidia/lib64:/usr/local/cuda/lib64
    fi
    local d
    for d in ${dirs//:/ }; do
        if [ -e "$d/libnvidia-opencl.so.1" ]; then echo "$d/libnvidia-opencl.so.1"; return 0; fi
    done
    return 1
}

step_icd() {
    local vendors=${OCL_ICD_VENDORS:-/etc/OpenCL/vendors}
    if [ -z "${GPUBO_CHECK_LIB_DIRS:-}" ] && grep -qsl nvidia "$vendors"/*.icd; then
        echo "an ICD file in $vendors names NVIDIA's library" | tee "$out/icd.txt"
        return 0
    fi
    local lib
    if ! lib=$(find_nvidia_lib); then
        echo "no ICD names NVIDIA and libnvidia-opencl.so.1 was not found: OpenCL sees what it sees" | tee "$out/icd.txt"
        return 0
    fi
    mkdir -p "$out/icd"
    echo "$lib" > "$out/icd/nvidia.icd"
    echo "wrote $out/icd/nvidia.icd -> $lib; OCL_ICD_VENDORS=$out/icd" | tee "$out/icd.txt"
}

icd_env() {  # the environment every later step runs in
    if [ -f "$out/icd/nvidia.icd" ]; then export OCL_ICD_VENDORS="$out/icd"; fi
    export GPUBO_DEVICE=${GPUBO_DEVICE:-gpu}
}

step_info() {
    timeout 60 "$py" -m gpubo info > "$out/info.txt" 2>&1
    local status=$?
    timeout 60 "$py" -m gpubo info --json > "$out/info.json" 2>> "$out/info.txt" || status=1
    cat "$out/info.txt"
    return $status
}

step_tests() {
    # The core and store suites, against the GPU (a fresh folder: no cache).
    (cd "$repo" && timeout 180 "$py" -m pytest -q -p no:cacheprovider \
        --junitxml="$out/tests.xml" tests/test_roundtrip.py tests/test_budget.py tests/test_kernels.py \
        tests/test_batch.py tests/test_store_contract.py tests/test_store.py) > "$out/tests.log" 2>&1
    local status=$?
    tail -3 "$out/tests.log"
    return $status
}

step_bench() {
    # One quick run per transfer strategy and checksum placement this gpubo
    # offers (`gpubo bench --help` says which), else one default run.
    local help status=0 ran=0
    help=$("$py" -m gpubo bench --help 2>/dev/null)
    local transfers=("") sums=("")
    if grep -q -- "--transfer" <<< "$help"; then transfers=(map bounce); fi
    if grep -q -- "--checksums" <<< "$help"; then sums=(host device); fi
    local t c name args
    for t in "${transfers[@]}"; do
        for c in "${sums[@]}"; do
            name="bench${t:+-$t}${c:+-$c}"
            args=(--quick --json)
            [ -z "$t" ] || args+=(--transfer "$t")
            [ -z "$c" ] || args+=(--checksums "$c")
            timeout 150 "$py" -m gpubo bench "${args[@]}" > "$out/$name.json" 2> "$out/$name.log" || status=1
            ran=$((ran + 1))
        done
    done
    echo "$ran bench run(s)"
    return $status
}

step_summary() {
    "$py" - "$out" <<'EOF'
import json, pathlib, sys
import xml.etree.ElementTree as ET

out = pathlib.Path(sys.argv[1])
summary = {"steps": [], "info": None, "tests": None, "bench": {}}
for line in (out / "steps.tsv").read_text().splitlines():
    step, status, seconds = line.split("\t")
    summary["steps"].append({"step": step, "status": int(status), "seconds": int(seconds)})
try:
    summary["info"] = json.loads((out / "info.json").read_text())
except (OSError, ValueError) as e:
    summary["info"] = {"error": str(e)}
try:
    suite = ET.parse(out / "tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    summary["tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
except (OSError, ET.ParseError, AttributeError) as e:
    summary["tests"] = {"error": str(e)}
for path in sorted(out.glob("bench*.json")):
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        summary["bench"][path.stem] = {"error": f"not JSON: {e}"}
        continue
    goals = data.get("goals", []) if isinstance(data, dict) else []
    config = data.get("config") or {} if isinstance(data, dict) else {}
    rows = []
    for t in data.get("throughput", []) if isinstance(data, dict) else []:
        for c in t.get("cases", []):
            rows.append({
                "nbytes": t.get("nbytes"),
                "backend": c.get("backend"),
                "checksums": c.get("checksums_where", c.get("checksums")),
                "evict_vs_d2h": (c.get("evict_vs_d2h") or {}).get("of_medians"),
                "restore_vs_h2d": (c.get("restore_vs_h2d") or {}).get("of_medians"),
            })
    summary["bench"][path.stem] = {
        "device": (data.get("machine") or {}).get("device") if isinstance(data, dict) else None,
        "transfer": config.get("transfer"),
        "checksums": config.get("checksums"),
        "throughput": rows,
        "goals": [{k: g.get(k) for k in ("goal", "value", "target", "unit", "met")} for g in goals],
    }
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(f"summary: {out / 'summary.json'}")
EOF
}

for step in ${steps//,/ }; do
    start=$(date +%s)
    echo "== $step"
    [ "$step" = install ] || [ "$step" = icd ] || icd_env
    "step_$step"
    status=$?
    [ "$step" = summary ] || record "$step" "$status" "$start"
    [ "$step" != summary ] || [ $status = 0 ] || failed=1
done
exit $failed
