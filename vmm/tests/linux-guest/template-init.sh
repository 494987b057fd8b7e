#!/bin/busybox sh
# init of the template test's initramfs: serves vsock port 1234 (as the
# agent serves its port) until the VM is stopped.
export PATH=/bin
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t devtmpfs dev /dev
export GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ
echo "template-test: serving"
exec guest_tool vsock-serve 1234
