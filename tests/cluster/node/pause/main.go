// Command pause is the sandbox ("pause") process of a test node's pods: it
// holds the pod's namespaces, reaps the orphans that land on it as PID 1 and
// exits on SIGINT or SIGTERM. A static Go stand-in for Kubernetes' own pause,
// built here because no image registry is reachable.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 4)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for s := range signals {
		if s != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
