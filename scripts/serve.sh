#!/usr/bin/env bash
# Serve an exported tf_finetune model with TF Serving in Docker (REST 8501, gRPC 8500).
set -euo pipefail

usage() {
  cat >&2 <<USAGE
usage: scripts/serve.sh [options] EXPORT_BASE

Runs tensorflow/serving in Docker on EXPORT_BASE, the export dir holding the integer
version dirs (1/, 2/, ...); TF Serving serves the highest version and picks up new ones.

options:
  --name NAME        model name in URLs (/v1/models/NAME) and for --model_name (default: model)
  --batching         enable server-side batching with scripts/batching.config
  --threads N        num_batch_threads for --batching (default: this host's cores)
  --rest-port PORT   host port for REST (default: 8501)
  --grpc-port PORT   host port for gRPC (default: 8500)
  --image IMAGE      Docker image (default: tensorflow/serving)
  --dry-run          print the docker command instead of running it
  -h, --help         show this help

then:  tf-finetune predict --server http://localhost:8501 --model_name NAME images/
       tf-finetune predict --grpc localhost:8500 --model_name NAME images/
USAGE
}

die() { echo "serve.sh: $*" >&2; exit 2; }

name=model batching=0 threads="" rest_port=8501 grpc_port=8500 image=tensorflow/serving dry_run=0
base=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) [[ $# -ge 2 ]] || die "--name needs a value"; name=$2; shift 2 ;;
    --batching) batching=1; shift ;;
    --threads) [[ $# -ge 2 ]] || die "--threads needs a value"; threads=$2; shift 2 ;;
    --rest-port) [[ $# -ge 2 ]] || die "--rest-port needs a value"; rest_port=$2; shift 2 ;;
    --grpc-port) [[ $# -ge 2 ]] || die "--grpc-port needs a value"; grpc_port=$2; shift 2 ;;
    --image) [[ $# -ge 2 ]] || die "--image needs a value"; image=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) usage; die "unknown option $1" ;;
    *) [[ -z "$base" ]] || die "one EXPORT_BASE only (got '$base' and '$1')"; base=$1; shift ;;
  esac
done

[[ -n "$base" ]] || { usage; exit 2; }
[[ "$name" =~ ^[A-Za-z0-9_.-]+$ ]] || die "--name '$name': use letters, digits, '_', '.' or '-'"
for port in "$rest_port" "$grpc_port"; do
  [[ "$port" =~ ^[0-9]+$ ]] || die "port '$port' is not a number"
done
[[ -d "$base" ]] || die "$base: no such directory; pass the export dir holding 1/, 2/, ..."
base=$(cd "$base" && pwd -P)
if [[ -f "$base/saved_model.pb" ]]; then
  die "$base is a version dir; pass its parent (the export base holding the version dirs)"
fi
shopt -s nullglob
versions=("$base"/[0-9]*/saved_model.pb)
shopt -u nullglob
[[ ${#versions[@]} -gt 0 ]] || die "$base holds no <version>/saved_model.pb; export a model first"

args=(run --rm -p "$rest_port:8501" -p "$grpc_port:8500"
      -v "$base:/models/$name:ro" -e "MODEL_NAME=$name")
server_flags=()
if [[ $batching -eq 1 ]]; then
  here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
  [[ -f "$here/batching.config" ]] || die "$here/batching.config is missing"
  if [[ -z "$threads" ]]; then
    threads=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)
  fi
  [[ "$threads" =~ ^[1-9][0-9]*$ ]] || die "--threads '$threads' is not a positive number"
  # A copy with num_batch_threads = cores, kept in the user's cache (one per thread count)
  # and mounted outside the read-only model dir.
  conf_dir="${XDG_CACHE_HOME:-$HOME/.cache}/tf_finetune"
  conf="$conf_dir/batching-$threads.config"
  mkdir -p "$conf_dir"
  sed -E "s/^(num_batch_threads[[:space:]]*\{[[:space:]]*value:[[:space:]]*)[0-9]+/\1$threads/" \
    "$here/batching.config" > "$conf"
  args+=(-v "$conf:/etc/tf_serving/batching.config:ro")
  server_flags+=(--enable_batching --batching_parameters_file=/etc/tf_serving/batching.config)
fi

cmd=(docker "${args[@]}" "$image" "${server_flags[@]}")
if [[ $dry_run -eq 1 ]]; then
  printf '%q ' "${cmd[@]}" | sed -e 's/ $//'
  echo
  exit 0
fi
command -v docker >/dev/null || die "docker not found; install Docker, or run tensorflow_model_server --port=8500 --rest_api_port=8501 --model_name=$name --model_base_path=$base"
echo "serving $base as '$name': REST http://localhost:$rest_port  gRPC localhost:$grpc_port" >&2
exec "${cmd[@]}"
