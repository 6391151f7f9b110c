"""The emulated WAN: islands in network namespaces joined by rate-limited, delayed links.

`atoll simulate --wan-rate 100mbit --wan-delay 20ms` runs each island in its own namespace.
`units` parses the flags, `namespaces` makes namespaces, TUN links and tbf rate limits through
iproute2, `delay_line` is the userspace process that adds the propagation delay (this kernel has
no netem), and `network.EmulatedWan` puts them together for one run and tears them down after.
"""
