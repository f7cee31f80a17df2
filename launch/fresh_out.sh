# Sourced by the launch scripts: `fresh_out DIR` empties DIR for a new run, but only a DIR
# that a launch script made (it holds the marker written when it was created), or one that
# does not exist or is empty. Any other path (a user's folder passed as OUT_DIR by
# mistake, a file) is refused with exit status 2 and left as it is.
fresh_out() {
    local dir=$1 marker=".shardckpt-launch-output"
    if [ -e "$dir" ] || [ -L "$dir" ]; then
        if [ -L "$dir" ] || [ ! -d "$dir" ]; then
            echo "refusing to use $dir as the output folder: it exists and is not a folder; pass a new path" >&2
            exit 2
        fi
        if [ ! -e "$dir/$marker" ] && [ -n "$(ls -A "$dir")" ]; then
            echo "refusing to empty $dir: it holds files and was not made by a launch script" \
                "(no $marker in it); pass a new or empty folder" >&2
            exit 2
        fi
        rm -rf "$dir"
    fi
    mkdir -p "$dir"
    : >"$dir/$marker"
}
