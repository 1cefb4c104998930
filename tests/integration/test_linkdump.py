"""The agent's own link dump reads what pyroute2 reads: every link's index,
name and alias, in a namespace with enough links to span several replies."""

from __future__ import annotations

import uuid

from pyroute2 import IPRoute, netns

from smtpguard.daemon.netns import run_in
from smtpguard.datapath import linkdump


def test_link_dump_matches_pyroute2() -> None:
    ns = f"sgtl{uuid.uuid4().hex[:6]}"
    netns.create(ns)
    try:
        def check() -> None:
            with IPRoute() as ipr:
                for i in range(300):
                    ipr.link("add", ifname=f"vnet{i}", kind="veth", peer={"ifname": f"pv{i}"})
                ipr.link("set", index=ipr.link_lookup(ifname="vnet7")[0],
                         ifalias="vm=web7 tenant=acme")
                want = {(int(m["index"]), m.get_attr("IFLA_IFNAME"), m.get_attr("IFLA_IFALIAS"))
                        for m in ipr.get_links()}
            got = set(linkdump.links())
            assert got == want
            assert len(got) == 601
            assert any(alias == "vm=web7 tenant=acme" for _, _, alias in got)

        run_in(ns, check)
    finally:
        netns.remove(ns)
