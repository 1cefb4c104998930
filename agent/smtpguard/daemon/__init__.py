"""The agent's composition and its life in the OS: the loop (agent) with its
parts (state, links, reload, report), `run --cleanup` (cleanup), systemd's
notify protocol (sdnotify) and network namespaces (netns). It may import every
other room; only lab/ and cli/ import it back, and only netns (and cli, agent)."""
