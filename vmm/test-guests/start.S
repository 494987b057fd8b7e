/* Entry from the VMM's 64-bit boot protocol: long mode, flat identity
 * paging, interrupts off, RSI = boot_params. The VMM's stack (0x8ff0) is
 * only a few bytes below its page tables, so switch to our own first. */
    .section .text.start, "ax"
    .code64
    .globl _start
_start:
    cli
    mov %rsi, %r12
    /* Guest RAM starts zeroed, but clear .bss anyway: a loader need not. */
    lea __bss_start(%rip), %rdi
    lea __bss_end(%rip), %rcx
    sub %rdi, %rcx
    shr $3, %rcx
    xor %eax, %eax
    rep stosq
    lea stack_top(%rip), %rsp
    mov %r12, %rdi
    call guest_main
1:  hlt
    jmp 1b

    .section .bss
    .balign 16
stack:
    .skip 16384
stack_top:

    .section .note.GNU-stack, "", @progbits
