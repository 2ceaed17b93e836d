// Command pause is the infrastructure ("sandbox") container of the test node's pods: PID 1 of
// each pod, holding its namespaces while the app containers come and go. The node has no
// registry to pull registry.k8s.io/pause from, so the project builds its own: as PID 1 it must
// reap orphaned children (else they stay zombies) and exit promptly on SIGTERM/SIGINT (else
// every pod deletion waits for the kill timeout). Standard library only, so the module needs
// no go.sum and builds offline.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for sig := range sigs {
		switch sig {
		case syscall.SIGCHLD:
			reap()
		default:
			os.Exit(0)
		}
	}
}

// reap collects every child that has exited, without blocking on those still running.
func reap() {
	for {
		var status syscall.WaitStatus
		pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
		if pid <= 0 || err != nil {
			return
		}
	}
}
