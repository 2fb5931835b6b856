# Runs inside the VM, from the shared directory (the image's PID 1 starts it):
# sets the machine up as `cargo xtask setup` sets up a host, runs the tests the
# plan lists one by one, and leaves each one's output and exit status in
# results/ for `cargo xtask vm` to read. Lines starting "warren-vm:" go to the
# serial console, which the host prints as they come.
set -u
share=/mnt/warren
results=$share/results

# What the tests need of the machine: a tmpfs /run (ip netns), a private
# /tmp, cgroup v2, bpffs for the agent's pins, loopback up.
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
ip link set lo up
hostname warren-vm

uname -r > "$results/kernel"
echo "warren-vm: booted kernel $(uname -r), $(nproc) CPUs, up $(cut -d' ' -f1 /proc/uptime) s"
# What this kernel offers eBPF (program and map types, helpers per program
# type), for docs/kernels.md and for reading a verifier's refusal against.
bpftool feature probe kernel > "$results/features.txt" 2>&1

export WARREN_BIN_DIR=$share/bin RUST_BACKTRACE=1
uptime_s() { cut -d. -f1 /proc/uptime; }
while read -r binary name; do
    [ -n "$binary" ] || continue
    start=$(uptime_s)
    "$share/tests/$binary" --exact "$name" --test-threads=1 \
        > "$results/$binary.$name.log" 2>&1
    status=$?
    seconds=$(( $(uptime_s) - start ))
    echo "$status $seconds" > "$results/$binary.$name.status"
    if [ "$status" = 0 ]; then verdict=ok; else verdict="FAILED (exit $status)"; fi
    echo "warren-vm: test $binary::$name ... $verdict, $seconds s"
done < "$share/plan"

# A failed test keeps its lab's files and the agents' logs under /tmp.
for kept in /tmp/warren-e2e /tmp/warren-lab; do
    [ -d "$kept" ] && cp -r "$kept" "$results/" 2>/dev/null
done
dmesg > "$results/dmesg.txt"
echo "warren-vm: done, up $(cut -d' ' -f1 /proc/uptime) s"
