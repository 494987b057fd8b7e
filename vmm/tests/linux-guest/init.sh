#!/bin/busybox sh
# init of the Linux boot test's initramfs: exercises serial, virtio-blk,
# virtio-net (tap) and vsock, then reboots (moat-vmm exits 0).
export PATH=/bin
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
export GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ
echo "linux-test: init running"
echo "linux-test: disk says $(dd if=/dev/vda bs=512 count=1 2>/dev/null | head -c 15)"
echo "linux-test: disk serial $(cat /sys/block/vda/serial)"
printf 'GUEST-WROTE-THIS' | dd of=/dev/vda bs=512 seek=1 conv=notrunc,fsync 2>/dev/null && echo "linux-test: disk written"
ip link set lo up
ip link set eth0 up
ip addr add 10.200.0.2/24 dev eth0
echo "linux-test: mac $(cat /sys/class/net/eth0/address)"
if ping -c 1 -W 20 10.200.0.1 >/dev/null; then echo "linux-test: ping ok"; else echo "linux-test: ping failed"; fi
guest_tool vsock-echo 1234 hello-from-guest
echo "linux-test: done"
sync
reboot -f
