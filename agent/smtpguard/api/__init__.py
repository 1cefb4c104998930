"""The control socket (control) and the operator's commands it carries
(commands). It reads datapath, inventory and policy, names detect, enforce and
respond types only for checking, and asks the running agent only through the
`RunningAgent` Protocol: it never imports daemon/."""
