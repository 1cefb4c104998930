// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * smtpguard datapath: count each VM's outbound SMTP connection attempts.
 *
 * Two tc classifiers (clsact, direct action) on every VM-facing interface:
 *   smtpg_ingress  packets the VM sends: attempts, retransmits, bytes,
 *                  distinct destinations;
 *   smtpg_egress   packets sent to the VM: the answer to each attempt
 *                  (SYN-ACK, RST).
 * Both count and return TC_ACT_UNSPEC, so the next tc filter on the hook
 * (another tool's) still runs. Enforcement is nftables; the one thing the
 * classifier changes is skb->mark, on the SYNs of an interface whose trip
 * wire went (struct trip), for the tables' rule that rejects them. On a
 * macvtap the VM's packets leave through the device's transmit path, where
 * netfilter's egress hook runs before tc's: there the table marks what it
 * refuses and smtpg_ingress, attached to the egress hook, counts the attempt
 * and then drops it (vm_tx_verdict), the one packet it ever drops.
 *
 * Load-time settings (-D from the agent): PIN_DIR, MAX_STATS, MAX_IFACES,
 * CONN_TABLE_SIZE, MAX_RECENT. Run-time settings come from maps: smtp_ports,
 * smtp_config.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/tcp.h>

#include "smtp_common.h"

/* What the kernel is told, as the SPDX line above says (bcc's footer turns it
 * into the program's license section; GPL-compatible, as the helpers used
 * here require). */
#define BPF_LICENSE Dual BSD/GPL

#ifndef PIN_DIR
#error "PIN_DIR must name the bpffs directory for this agent's maps"
#endif

#define VLAN_MAX_DEPTH 2	/* inner tags; the outer one is in skb->vlan_tci */
#define IPV6_EXT_MAX 6
#define L3_MAX_OFF 1024		/* headers deeper than this are not parsed */
#define PULL_LEN 256

/* TCP flags as in byte 13 of the header. */
#define F_FIN 0x01
#define F_SYN 0x02
#define F_RST 0x04
#define F_ACK 0x10

/* Maps are pinned so a restarted agent adopts its counters and nothing the
 * VMs did while it was down is lost. */
BPF_TABLE_PINNED("hash", struct smtp_key, struct smtp_stats, smtp_stats,
		 MAX_STATS, PIN_DIR "/smtp_stats");
/* The common LRU (one list for all CPUs), on purpose: BPF_F_NO_COMMON_LRU
 * gives each CPU its own share of the entries, so a VM whose SYNs all land on
 * one CPU would get 1/ncpus of the table, and its per-pop list rotation
 * measured slower here (+100 ns a new SYN). */
BPF_TABLE_PINNED("lru_hash", struct conn_key, struct conn_val, smtp_conns,
		 CONN_TABLE_SIZE, PIN_DIR "/smtp_conns");
/* 6 KiB a VM, allocated only for VMs that try SMTP. */
BPF_TABLE_PINNED("hash", __u32, struct dest_sketch, smtp_dests,
		 MAX_IFACES, PIN_DIR "/smtp_dests", BPF_F_NO_PREALLOC);
/* LRU hashes are always preallocated: MAX_RECENT * ~112 bytes (7 MB at
 * the default), whether or not the VMs send mail. */
BPF_TABLE_PINNED("lru_hash", struct recent_key, struct recent_val, smtp_recent,
		 MAX_RECENT, PIN_DIR "/smtp_recent");
/* Indexed by port; non-zero means SMTP. An array lookup is inlined by the
 * verifier, which keeps the non-SMTP path to a few instructions. */
BPF_TABLE_PINNED("array", __u32, __u8, smtp_ports, 65536,
		 PIN_DIR "/smtp_ports");
BPF_TABLE_PINNED("array", __u32, struct smtp_config, smtp_config, 1,
		 PIN_DIR "/smtp_config");
/* The trip wire (struct trip): the agent arms and disarms, the classifier
 * counts; a new attempt of an interface not armed costs one lookup. */
BPF_TABLE_PINNED("hash", __u32, struct trip, smtp_trip, MAX_IFACES,
		 PIN_DIR "/smtp_trip");
/* Indexed by FULL_*: only written when a map is full, so one shared array. */
BPF_TABLE_PINNED("array", __u32, __u64, smtp_full, FULL_SLOTS,
		 PIN_DIR "/smtp_full");
/* The agent's doorbell: set to 1 when counts change, cleared by the agent
 * before it reads them. The agent watches this one word (mmap'd) instead of
 * reading every map on a timer, so it reacts within milliseconds and idles
 * when nothing happens. Mostly read, so CPUs share the cache line. */
BPF_TABLE_PINNED("array", __u32, __u32, smtp_wake, 1,
		 PIN_DIR "/smtp_wake", BPF_F_MMAPABLE);
/* ... and when the word goes from 0 to 1, one record in this ring, whose fd
 * the agent waits on (epoll), so it sleeps until there is something to do:
 * at most one record per agent cycle. BPF_RINGBUF_OUTPUT spelled out, as bcc
 * has no pinned form of it. */
struct smtp_wake_ring_table_t {
	int key;
	u32 leaf;
	int (*ringbuf_output)(void *, u64, u64);
	void *(*ringbuf_reserve)(u64);
	void (*ringbuf_discard)(void *, u64);
	void (*ringbuf_submit)(void *, u64);
	u32 max_entries;
};
__attribute__((section("maps/ringbuf:" PIN_DIR "/smtp_wake_ring")))
struct smtp_wake_ring_table_t smtp_wake_ring = { .max_entries = 4096 };

/* Never written: the zero value a new sketch starts from (too big for the
 * stack). */
BPF_PERCPU_ARRAY(sketch_zero, struct dest_sketch, 1);

struct vlan_hdr {
	__be16 tci;
	__be16 proto;
};

struct ipv6_frag {
	__u8 nexthdr;
	__u8 reserved;
	__be16 frag_off;
	__be32 id;
};

enum parse_result {
	PARSE_SKIP,		/* not TCP, malformed, or a non-first fragment */
	PARSE_SHORT,		/* headers beyond the linear data */
	PARSE_TCP,
};

struct l4 {
	void *ip;
	struct tcphdr *tcp;
	__u8 family;
};

/* Walk L2/L3 to the TCP header. Every read is bounds-checked against
 * data_end; a header that lies about its length makes the frame PARSE_SKIP,
 * so malformed frames pass untouched and are never counted. */
static __always_inline enum parse_result find_tcp(struct __sk_buff *skb,
						  struct l4 *l)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	__u32 off = sizeof(*eth);
	__u32 l3_end;
	__be16 proto;

	if ((void *)(eth + 1) > data_end)
		return PARSE_SHORT;
	proto = eth->h_proto;
#pragma unroll
	for (int i = 0; i < VLAN_MAX_DEPTH; i++) {
		struct vlan_hdr *vh;

		if (proto != bpf_htons(ETH_P_8021Q) &&
		    proto != bpf_htons(ETH_P_8021AD))
			break;
		vh = data + off;
		if ((void *)(vh + 1) > data_end)
			return PARSE_SHORT;
		proto = vh->proto;
		off += sizeof(*vh);
	}

	if (proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *iph = data + off;
		__u32 ihl;

		if ((void *)(iph + 1) > data_end)
			return PARSE_SHORT;
		if (iph->protocol != IPPROTO_TCP || iph->version != 4)
			return PARSE_SKIP;
		/* A later fragment carries no TCP header. A first fragment
		 * does, and is counted: splitting a SYN must not hide it. */
		if (iph->frag_off & bpf_htons(0x1fff))
			return PARSE_SKIP;
		ihl = iph->ihl * 4;
		if (ihl < sizeof(*iph))
			return PARSE_SKIP;
		l3_end = off + bpf_ntohs(iph->tot_len);
		l->ip = iph;
		l->family = FAMILY_V4;
		off += ihl;
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = data + off;
		__u8 nh;

		if ((void *)(ip6 + 1) > data_end)
			return PARSE_SHORT;
		if (ip6->version != 6)
			return PARSE_SKIP;
		l3_end = off + sizeof(*ip6) + bpf_ntohs(ip6->payload_len);
		nh = ip6->nexthdr;
		l->ip = ip6;
		l->family = FAMILY_V6;
		off += sizeof(*ip6);
#pragma unroll
		for (int i = 0; i < IPV6_EXT_MAX; i++) {
			struct ipv6_opt_hdr *oh;
			struct ipv6_frag *fh;

			if (nh == IPPROTO_TCP)
				break;
			if (off > L3_MAX_OFF)
				return PARSE_SKIP;
			switch (nh) {
			case IPPROTO_HOPOPTS:
			case IPPROTO_ROUTING:
			case IPPROTO_DSTOPTS:
				oh = data + off;
				if ((void *)(oh + 1) > data_end)
					return PARSE_SHORT;
				nh = oh->nexthdr;
				off += (oh->hdrlen + 1) * 8;
				break;
			case IPPROTO_AH:
				oh = data + off;
				if ((void *)(oh + 1) > data_end)
					return PARSE_SHORT;
				nh = oh->nexthdr;
				off += (oh->hdrlen + 2) * 4;
				break;
			case IPPROTO_FRAGMENT:
				fh = data + off;
				if ((void *)(fh + 1) > data_end)
					return PARSE_SHORT;
				if (fh->frag_off & bpf_htons(0xfff8))
					return PARSE_SKIP;
				nh = fh->nexthdr;
				off += sizeof(*fh);
				break;
			default:
				return PARSE_SKIP;
			}
		}
		if (nh != IPPROTO_TCP)
			return PARSE_SKIP;
	} else {
		return PARSE_SKIP;
	}

	if (off > L3_MAX_OFF)
		return PARSE_SKIP;
	l->tcp = data + off;
	if ((void *)(l->tcp + 1) > data_end)
		return PARSE_SHORT;
	/* The TCP header must lie inside the IP packet it claims to be in. */
	if (l->tcp->doff < 5 || off + l->tcp->doff * 4 > l3_end)
		return PARSE_SKIP;
	return PARSE_TCP;
}

/* Headers normally sit in the linear part of the skb; pull them in when a
 * driver left them in fragments, and parse once more. */
static __always_inline enum parse_result parse(struct __sk_buff *skb,
					       struct l4 *l)
{
	enum parse_result r = find_tcp(skb, l);

	if (r != PARSE_SHORT || skb->len <= skb->data_end - skb->data)
		return r;
	if (bpf_skb_pull_data(skb, skb->len < PULL_LEN ? skb->len : PULL_LEN))
		return PARSE_SKIP;
	r = find_tcp(skb, l);
	return r == PARSE_TCP ? r : PARSE_SKIP;
}

static __always_inline int is_smtp_port(__u16 port)
{
	__u32 idx = port;
	__u8 *on = smtp_ports.lookup(&idx);

	return on && *on;
}

static __always_inline void copy_addrs(struct l4 *l, __u8 *src, __u8 *dst)
{
	if (l->family == FAMILY_V4) {
		struct iphdr *iph = l->ip;

		__builtin_memset(src, 0, 10);
		__builtin_memset(dst, 0, 10);
		src[10] = src[11] = dst[10] = dst[11] = 0xff;
		__builtin_memcpy(src + 12, &iph->saddr, 4);
		__builtin_memcpy(dst + 12, &iph->daddr, 4);
	} else {
		struct ipv6hdr *ip6 = l->ip;

		__builtin_memcpy(src, &ip6->saddr, 16);
		__builtin_memcpy(dst, &ip6->daddr, 16);
	}
}

/* murmur3's finaliser over the address words; the sketch needs only well
 * spread bits, not a cryptographic hash. */
static __always_inline __u32 addr_hash(const __u8 *a)
{
	const __u32 *w = (const __u32 *)a;
	__u32 h = w[0] * 0x9e3779b1;

	h = (h ^ w[1]) * 0x85ebca77;
	h = (h ^ w[2]) * 0xc2b2ae3d;
	h = (h ^ w[3]) * 0x27d4eb2f;
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

/* Position of the lowest set bit, plus one (BPF has no ctz instruction). */
static __always_inline __u8 hll_rank(__u32 w)
{
	__u8 r = 1;

	if (!w)
		return 32 - HLL_BITS + 1;
	if (!(w & 0xffff)) { r += 16; w >>= 16; }
	if (!(w & 0xff)) { r += 8; w >>= 8; }
	if (!(w & 0xf)) { r += 4; w >>= 4; }
	if (!(w & 0x3)) { r += 2; w >>= 2; }
	if (!(w & 0x1)) { r += 1; }
	return r;
}

static __always_inline void hll_add(struct hll_slot *s, __u64 epoch, __u32 h)
{
	__u32 idx = h & (HLL_REGS - 1);
	__u32 bit = (h >> (32 - 11)) & (LC_BITS - 1);
	__u8 rank = hll_rank(h >> HLL_BITS);
	__u64 tagged = epoch | SLOT_LIVE;

	/* Reusing a slot of an old epoch: racy across CPUs, so a bit or
	 * register set during the reset may be lost, which lowers the estimate
	 * by at most one destination. A slot of this epoch written before the
	 * live bit existed keeps its bits and only gets the tag. Compared before
	 * it is stored: a store on every SYN would bounce the line across CPUs. */
	if (s->epoch != tagged) {
		if ((s->epoch & ~SLOT_LIVE) != epoch) {
			__u64 *r = (__u64 *)s->reg;
#pragma unroll
			for (int i = 0; i < LC_WORDS; i++)
				s->bits[i] = 0;
#pragma unroll
			for (int i = 0; i < HLL_REGS / 8; i++)
				r[i] = 0;
		}
		s->epoch = tagged;
	}
	/* Read first: a destination seen before in this slot finds its bit
	 * set, and a read leaves the line shared by the VM's CPUs where a
	 * locked write would pull it over (-85 ns a SYN with two CPUs busy on
	 * one VM). Same for the register. */
	if (!(s->bits[bit / 64] & (1ULL << (bit % 64))))
		__sync_fetch_and_or(&s->bits[bit / 64], 1ULL << (bit % 64));
	if (rank > s->reg[idx])
		s->reg[idx] = rank;
}

static __always_inline void map_full(__u32 which)
{
	__u64 *n = smtp_full.lookup(&which);

	if (n)
		__sync_fetch_and_add(n, 1);
}

static __always_inline void wake_agent(void)
{
	__u32 zero = 0;
	__u32 *w = smtp_wake.lookup(&zero);

	if (w && !*w) {
		__u32 one = 1;

		*w = 1;
		/* Two CPUs may both get here: two records, one wake-up. A full
		 * ring is harmless: the agent also looks at the word each tick. */
		smtp_wake_ring.ringbuf_output(&one, sizeof(one), 0);
	}
}

/* The sketch's slot clock: count_syn's coarse clock plus the configured offset
 * (0 but in tests). An inlined array lookup, on new attempts only. */
static __always_inline __u64 slot_clock(__u64 now)
{
	__u32 zero = 0;
	struct smtp_config *c = smtp_config.lookup(&zero);

	return c ? now + c->slot_offset_ns : now;
}

/* d: the VM's sketch as looked up by the caller (NULL: it has none yet). */
static __always_inline void count_destination(__u32 ifindex, const __u8 *daddr,
					      __u64 now, struct dest_sketch *d)
{
	__u32 zero = 0;
	__u64 fine, coarse;
	__u32 h;

	if (!d) {
		struct dest_sketch *z = sketch_zero.lookup(&zero);

		if (!z)
			return;
		smtp_dests.insert(&ifindex, z);
		d = smtp_dests.lookup(&ifindex);
		if (!d) {
			map_full(FULL_DESTS);	/* attempts still count */
			return;
		}
	}
	h = addr_hash(daddr);
	now = slot_clock(now);
	fine = now >> FINE_SLOT_SHIFT;
	coarse = now >> COARSE_SLOT_SHIFT;
	hll_add(&d->fine[fine & (FINE_SLOTS - 1)], fine, h);
	hll_add(&d->coarse[coarse & (COARSE_SLOTS - 1)], coarse, h);
}

/* One more attempt to rk's destination in the record of recent
 * destinations; v: its entry as the caller looked it up (a VM's destinations
 * repeat, and an update that finds its key still takes the bucket lock and a
 * fresh LRU node), NULL when it had none. */
static __always_inline void count_recent(struct recent_key *rk,
					 struct recent_val *v, __u64 now)
{
	struct recent_val rv = { .attempts = 1, .first_ns = now, .last_ns = now };

	if (!v) {
		/* Two CPUs may both miss; BPF_NOEXIST lets exactly one insert
		 * win, and the loser adds to the winner's entry. */
		if (smtp_recent.insert(rk, &rv) == 0)
			return;
		v = smtp_recent.lookup(rk);
		if (!v)
			return;	/* evicted in between: one count lost */
	}
	__sync_fetch_and_add(&v->attempts, 1);
	/* A plain store: racing CPUs may leave the older of two near-equal
	 * times, which no reader can tell apart. */
	v->last_ns = now;
}

static __always_inline struct smtp_stats *stats_for(__u32 ifindex, __u16 port)
{
	struct smtp_key key = { .ifindex = ifindex, .port = port };
	struct smtp_stats zero = {};

	return smtp_stats.lookup_or_try_init(&key, &zero);
}

/* A new attempt (fresh) or a retransmitted SYN on an armed interface (t: its
 * wire, NULL when not armed): the attempt that reaches `at` passes (the
 * crossing one); every SYN after it, retransmissions included, is marked for
 * the tables to reject. */
static __always_inline void trip_wire(struct __sk_buff *skb, int fresh,
				      struct trip *t)
{
	struct smtp_config *c;
	__u32 zero = 0;
	__u64 n, at;

	if (!t)
		return;
	at = t->at;
	if (!at)
		return;
	n = fresh ? __sync_fetch_and_add(&t->n, 1) + 1 : t->n;
	if (n < at || (fresh && n == at))
		return;	/* (the agent was woken for this attempt already) */
	c = smtp_config.lookup(&zero);
	if (c && c->trip_mark)
		skb->mark |= c->trip_mark;
}

static __always_inline __u64 no_answer_ns(void)
{
	__u32 zero = 0;
	struct smtp_config *c = smtp_config.lookup(&zero);

	return c && c->no_answer_ns ? c->no_answer_ns : 2000000000ULL;
}

static __always_inline void count_syn(struct __sk_buff *skb, struct l4 *l,
				      struct smtp_stats *st, __u16 dport)
{
	struct conn_key ck = {};
	struct conn_val cv = {};
	struct conn_val *old;
	struct trip *t;
	/* The coarse clock (the last tick's time, CLOCK_MONOTONIC_COARSE): what
	 * it stamps (an attempt's start, the sketch's slots of 8.6 s and more,
	 * a destination's first and last attempt) needs no better than a tick,
	 * and it reads the time kept at the last tick where bpf_ktime_get_ns()
	 * also reads and scales the clocksource (-20 ns a new SYN here). */
	__u64 now = bpf_ktime_get_coarse_ns();

	ck.ifindex = skb->ifindex;
	ck.isn = bpf_ntohl(l->tcp->seq);
	ck.sport = bpf_ntohs(l->tcp->source);
	ck.dport = dport;
	ck.family = l->family;
	copy_addrs(l, ck.saddr, ck.daddr);
	cv.first_ns = now;
	cv.state = CONN_PENDING;

	/* A retransmission finds its attempt with a lookup. A new attempt is
	 * inserted with BPF_NOEXIST, which keeps the dedup exact when two CPUs
	 * race on copies of one SYN: exactly one insert wins. (Inserting first
	 * would cost an LRU node allocation on every retransmission.) */
	old = smtp_conns.lookup(&ck);
	if (!old) {
		struct recent_key rk = { .ifindex = ck.ifindex, .family = ck.family };
		struct dest_sketch *d;
		struct recent_val *rv;

		/* The lookups a new attempt needs, all before its insert and
		 * atomics: each locked instruction waits for the loads before it,
		 * so cache misses issued together overlap (-15 ns a new SYN). */
		__builtin_memcpy(rk.daddr, ck.daddr, sizeof(rk.daddr));
		d = smtp_dests.lookup(&ck.ifindex);
		rv = smtp_recent.lookup(&rk);
		t = smtp_trip.lookup(&ck.ifindex);
		if (smtp_conns.insert(&ck, &cv) == 0) {
			__sync_fetch_and_add(&st->attempts, 1);
			st->last_attempt_ns = now;
			count_destination(ck.ifindex, ck.daddr, now, d);
			count_recent(&rk, rv, now);
			wake_agent();
			trip_wire(skb, 1, t);
			return;
		}
		old = smtp_conns.lookup(&ck);
	}
	__sync_fetch_and_add(&st->retransmits, 1);
	t = smtp_trip.lookup(&ck.ifindex);
	trip_wire(skb, 0, t);
	if (old && old->state == CONN_PENDING &&
	    now - old->first_ns >= no_answer_ns() &&
	    __sync_val_compare_and_swap(&old->state, CONN_PENDING,
					CONN_NO_ANSWER) == CONN_PENDING) {
		__sync_fetch_and_add(&st->no_answer, 1);
		wake_agent();
	}
}

/* smtpg_ingress on a device's egress hook (a macvtap, whose guest sends
 * through its transmit path; datapath/attachment.py): a packet there was
 * never received by the device (skb_iif is another's, or none). Netfilter's
 * egress hook runs before tc's, so the netdev table has judged this SYN
 * already and marked it rather than dropped it, for the attempt to be
 * counted here first; and a wire that tripped here has no table after us.
 * Either way the SYN carries the trip mark, and stops here. */
static __always_inline int vm_tx_verdict(struct __sk_buff *skb)
{
	struct smtp_config *c;
	__u32 zero = 0;

	if (skb->ingress_ifindex == skb->ifindex || !skb->mark)
		return TC_ACT_UNSPEC;	/* at ingress the tables come after us */
	c = smtp_config.lookup(&zero);
	if (c && c->trip_mark && (skb->mark & c->trip_mark) == c->trip_mark)
		return TC_ACT_SHOT;
	return TC_ACT_UNSPEC;
}

int smtpg_ingress(struct __sk_buff *skb)
{
	struct smtp_stats *st;
	struct l4 l = {};
	int verdict = TC_ACT_UNSPEC;
	__u16 dport;
	__u8 flags;

	if (parse(skb, &l) != PARSE_TCP)
		return TC_ACT_UNSPEC;
	dport = bpf_ntohs(l.tcp->dest);
	if (!is_smtp_port(dport))
		return TC_ACT_UNSPEC;

	st = stats_for(skb->ifindex, dport);
	if (!st) {
		map_full(FULL_STATS);	/* counted, and exported with the fill level */
		return TC_ACT_UNSPEC;
	}
	flags = ((__u8 *)l.tcp)[13];
	/* A SYN alone opens an attempt; SYN with RST/FIN/ACK is not one. */
	if ((flags & (F_SYN | F_ACK | F_RST | F_FIN)) == F_SYN) {
		count_syn(skb, &l, st, dport);
		verdict = vm_tx_verdict(skb);
	}
	/* After count_syn: its lookups go first (see there). */
	__sync_fetch_and_add(&st->packets, 1);
	__sync_fetch_and_add(&st->bytes, skb->len);
	return verdict;
}

int smtpg_egress(struct __sk_buff *skb)
{
	struct conn_key ck = {};
	struct conn_val *cv;
	struct smtp_stats *st;
	struct l4 l = {};
	__u64 outcome;
	__u16 sport;
	__u8 flags;

	if (parse(skb, &l) != PARSE_TCP)
		return TC_ACT_UNSPEC;
	sport = bpf_ntohs(l.tcp->source);
	if (!is_smtp_port(sport))
		return TC_ACT_UNSPEC;

	/* Only an answer to the SYN acknowledges ISN + 1, so the attempt's key
	 * can be rebuilt from the reply alone. */
	flags = ((__u8 *)l.tcp)[13];
	if (!(flags & F_ACK))
		return TC_ACT_UNSPEC;
	if (flags & F_RST)
		outcome = CONN_RESET;
	else if (flags & F_SYN)
		outcome = CONN_COMPLETED;
	else
		return TC_ACT_UNSPEC;

	ck.ifindex = skb->ifindex;
	ck.isn = bpf_ntohl(l.tcp->ack_seq) - 1;
	ck.sport = bpf_ntohs(l.tcp->dest);
	ck.dport = sport;
	ck.family = l.family;
	copy_addrs(&l, ck.daddr, ck.saddr);
	cv = smtp_conns.lookup(&ck);
	if (!cv || cv->state != CONN_PENDING)
		return TC_ACT_UNSPEC;
	if (__sync_val_compare_and_swap(&cv->state, CONN_PENDING, outcome) !=
	    CONN_PENDING)
		return TC_ACT_UNSPEC;
	st = stats_for(skb->ifindex, sport);
	if (!st)
		return TC_ACT_UNSPEC;
	if (outcome == CONN_COMPLETED)
		__sync_fetch_and_add(&st->completed, 1);
	else
		__sync_fetch_and_add(&st->reset, 1);
	wake_agent();
	return TC_ACT_UNSPEC;
}
