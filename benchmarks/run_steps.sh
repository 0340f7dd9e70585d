# Sourced by the benchmark scripts (fine_grained.sh, fsmoe_compare.sh, model_validation_runs.sh): their
# common flags, --repeats N and --dry-run, and step(), which prints a command and runs it unless
# --dry-run. Set `repeats` to the script's default before sourcing it with the script's arguments.
dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --repeats) repeats="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    *) echo "$(basename "$0"): unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done

step() {  # print a command; run it unless --dry-run
  echo "+ $*"
  if [ "$dry_run" = 0 ]; then "$@"; fi
}
