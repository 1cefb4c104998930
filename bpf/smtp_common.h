/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The contract between the tc classifier (smtp_count.c) and the agent.
 * Every struct here has a ctypes mirror in agent/smtpguard/datapath/maps.py;
 * tests/bpf/test_layout.py compares their sizes with bcc's Key/Leaf types.
 *
 * Sizes that are fixed at load time come in as -D flags from the agent
 * (datapath/loader.py); the defaults below only keep editors happy.
 */
#ifndef SMTP_COMMON_H
#define SMTP_COMMON_H

#ifndef MAX_STATS
#define MAX_STATS 32768		/* (interface, SMTP port) pairs */
#endif
#ifndef MAX_IFACES
#define MAX_IFACES 4096		/* VM interfaces with a destination sketch */
#endif
#ifndef CONN_TABLE_SIZE
#define CONN_TABLE_SIZE 262144	/* attempts remembered for SYN dedup (LRU) */
#endif
#ifndef MAX_RECENT
#define MAX_RECENT 65536	/* (interface, destination) pairs recorded (LRU) */
#endif

/* Distinct destinations, per VM, in time slots: a 2048-bit linear-counting
 * bitmap (about 2% error up to 6,000 destinations a window) and 256
 * HyperLogLog registers for beyond (6.5%). */
#define HLL_BITS 8
#define HLL_REGS (1 << HLL_BITS)
#define LC_BITS 2048
#define LC_WORDS (LC_BITS / 64)
/* Slot lengths are powers of two nanoseconds: a shift, not a division, on
 * the per-attempt path. */
#define FINE_SLOTS 8			/* the minute window: 7 slots */
#define COARSE_SLOTS 16			/* the hour window: 13 slots */
#define FINE_SLOT_SHIFT 33		/* 2^33 ns = 8.6 s */
#define COARSE_SLOT_SHIFT 38		/* 2^38 ns = 4.6 min */

#define FAMILY_V4 4
#define FAMILY_V6 6

/* Outcome of one attempt; decided once, by the first answer seen. */
#define CONN_PENDING 0
#define CONN_COMPLETED 1	/* SYN-ACK sent to the VM */
#define CONN_RESET 2		/* RST answering the SYN */
#define CONN_NO_ANSWER 3	/* SYN retransmitted >= no_answer_ns after the first */

struct smtp_key {
	__u32 ifindex;
	__u16 port;		/* host order */
	__u16 pad;
};

struct smtp_stats {
	__u64 attempts;		/* distinct connection attempts (SYN with a new ISN) */
	__u64 retransmits;	/* repeated SYNs of an attempt already counted */
	__u64 completed;
	__u64 reset;
	__u64 no_answer;
	__u64 packets;		/* every packet the VM sent to this port */
	__u64 bytes;		/* their length on the wire (L2) */
	__u64 last_attempt_ns;	/* bpf_ktime_get_ns() of the newest attempt */
};

/* IPv4 addresses are stored v4-mapped (::ffff:a.b.c.d). */
struct conn_key {
	__u32 ifindex;
	__u32 isn;		/* tells apart attempts that reuse a 4-tuple */
	__u16 sport;
	__u16 dport;
	__u8 family;
	__u8 pad[3];
	__u8 saddr[16];
	__u8 daddr[16];
};

struct conn_val {
	__u64 first_ns;
	__u64 state;		/* 64-bit: cmpxchg needs it without alu32 */
};

/* The record of recent destinations: exact attempts per (interface,
 * destination address), for the abuse desk's "where did this VM send".
 * An LRU: a VM spraying more addresses than it holds pushes out the least
 * recently used ones, and an address pushed out and seen again starts from
 * one. daddr is stored like conn_key's (IPv4 v4-mapped); family tells the
 * two apart. */
struct recent_key {
	__u32 ifindex;
	__u8 family;		/* FAMILY_V4 or FAMILY_V6 */
	__u8 pad[3];
	__u8 daddr[16];
};

struct recent_val {
	__u64 attempts;		/* counted exactly like smtp_stats.attempts */
	__u64 first_ns;		/* bpf_ktime_get_ns() of the first attempt */
	__u64 last_ns;		/* and of the newest */
};

/* A slot's epoch is (clock >> shift) | SLOT_LIVE: the live bit tells a
 * written slot from an empty one (all zeros), so epoch 0 (the first
 * 8.6 s / 4.6 min after boot) counts like any other. Slots written before
 * the bit existed hold the bare epoch, which readers still accept (and the
 * classifier re-tags in place when it writes to the same epoch again). */
#define SLOT_LIVE (1ULL << 63)

struct hll_slot {
	__u64 epoch;		/* (clock >> shift) | SLOT_LIVE; 0: never written */
	__u64 bits[LC_WORDS];
	__u8 reg[HLL_REGS];
};

struct dest_sketch {
	struct hll_slot fine[FINE_SLOTS];
	struct hll_slot coarse[COARSE_SLOTS];
};

/* smtp_full: how often a full map made the classifier skip something, by map.
 * A full smtp_stats leaves an (interface, port) uncounted; a full smtp_dests
 * leaves a VM's destinations unsketched. Never silent: the agent exports
 * these next to each map's fill level. (LRU maps evict instead.) */
#define FULL_STATS 0
#define FULL_DESTS 1
#define FULL_SLOTS 2

struct smtp_config {
	__u64 no_answer_ns;
	/* Added to bpf_ktime_get_ns() for the sketch's time slots only: 0 in
	 * production; tests move it to put attempts in the first slots after
	 * boot without waiting for a reboot. */
	__u64 slot_offset_ns;
	/* OR-ed into skb->mark of the SYNs of a tripped interface (below); the
	 * nftables tables reject what carries it. 0: no trip wire. */
	__u32 trip_mark;
	__u32 pad;
};

/* The trip wire, one per armed interface (smtp_trip): the agent writes
 * {n = 0, at = the attempts its VM may still make before it crosses a block
 * threshold}; the classifier counts each new attempt in n, lets the at-th
 * through (the crossing one) and marks every SMTP SYN after it, so the
 * tables stop the VM from its next attempt on, in the kernel, while the
 * agent (woken) records the block and disarms. */
struct trip {
	__u64 n;		/* new attempts since armed (the classifier's) */
	__u64 at;		/* trip once n reaches it; 0: disarmed */
};

#endif /* SMTP_COMMON_H */
