// Package gosnapsuite runs containerd's own snapshotter conformance suite
// (github.com/containerd/containerd/snapshots/testsuite, Debian's 1.6.20 sources) against a
// snapshotter reached over containerd's snapshots gRPC API. It is built by
// tests/support/gosnap.py with GO111MODULE=off against /usr/share/gocode.
//
// The mode is chosen by the environment (exactly one of the first two must be set):
//
//	KIPU_SNAP_CMD        proxy mode: a JSON array of argv that starts the snapshotter under
//	                     test; "{root}" and "{socket}" inside any argument are replaced by the
//	                     test's fresh root directory and a unix socket path inside it. One
//	                     process per sub-test; it must serve the gRPC
//	                     containerd.services.snapshots.v1.Snapshots API on the socket, and exit
//	                     with status 0 on SIGTERM.
//	KIPU_SNAP_CONTAINERD containerd mode: a running containerd's gRPC socket; the suite goes
//	                     through containerd's snapshot service (metadata layer + snapshotter),
//	                     exactly as containerd's integration test TestSnapshotterClient does.
//	KIPU_SNAP_SNAPSHOTTER the snapshotter name sent in every request (and given to the suite,
//	                     which uses it in temp dir names); default "overlayfs".
//	KIPU_SNAP_NAMESPACE  if set, the containerd namespace of every call (the suite itself puts
//	                     "testsuite" in the context, which reaches the server as the
//	                     "containerd-namespace" gRPC header).
//	KIPU_SNAP_START_TIMEOUT seconds to wait for the socket to accept a gRPC connection (20).
//	KIPU_SNAP_STOP_TIMEOUT  seconds to wait for the process after SIGTERM before SIGKILL (10).
package gosnapsuite

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/log"
	"github.com/containerd/containerd/mount"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/pkg/dialer"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"github.com/sirupsen/logrus"
	"google.golang.org/grpc"
)

const socketName = "snapshotter.sock"

func envSeconds(name string, def time.Duration) time.Duration {
	if v := os.Getenv(name); v != "" {
		if f, err := strconv.ParseFloat(v, 64); err == nil && f > 0 {
			return time.Duration(f * float64(time.Second))
		}
	}
	return def
}

func snapshotterName() string {
	if v := os.Getenv("KIPU_SNAP_SNAPSHOTTER"); v != "" {
		return v
	}
	return "overlayfs"
}

// TestSnapshotterSuite is the only test; its sub-tests are the suite's.
func TestSnapshotterSuite(t *testing.T) {
	cmdJSON, address := os.Getenv("KIPU_SNAP_CMD"), os.Getenv("KIPU_SNAP_CONTAINERD")
	name := snapshotterName()
	var factory testsuite.SnapshotterFunc
	switch {
	case cmdJSON != "" && address != "":
		t.Fatal("set only one of KIPU_SNAP_CMD (proxy mode) and KIPU_SNAP_CONTAINERD (containerd mode)")
	case cmdJSON != "":
		var argv []string
		if err := json.Unmarshal([]byte(cmdJSON), &argv); err != nil || len(argv) == 0 {
			t.Fatalf("KIPU_SNAP_CMD must be a non-empty JSON array of strings: %q (%v)", cmdJSON, err)
		}
		factory = proxyFactory(argv, name)
	case address != "":
		factory = containerdFactory(address, name)
	default:
		t.Skip("neither KIPU_SNAP_CMD (proxy mode) nor KIPU_SNAP_CONTAINERD (containerd mode) is set")
	}
	if ns := os.Getenv("KIPU_SNAP_NAMESPACE"); ns != "" {
		factory = withNamespace(factory, ns)
	}
	testsuite.SnapshotterSuite(t, name, factory)
}

// dial connects to a unix socket and blocks until the gRPC (HTTP/2) connection is ready.
func dial(ctx context.Context, socket string, timeout time.Duration) (*grpc.ClientConn, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	return grpc.DialContext(ctx, dialer.DialAddress(socket),
		grpc.WithInsecure(), grpc.WithBlock(), grpc.FailOnNonTempDialError(true),
		grpc.WithContextDialer(dialer.ContextDialer))
}

func containerdFactory(address, name string) testsuite.SnapshotterFunc {
	return func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		conn, err := dial(ctx, address, envSeconds("KIPU_SNAP_START_TIMEOUT", 20*time.Second))
		if err != nil {
			return nil, nil, fmt.Errorf("connect to containerd at %s: %w", address, err)
		}
		// What containerd.Client.SnapshotService(name) returns, minus the client's other
		// services: the suite's calls reach containerd's snapshot service unchanged.
		return proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), name), conn.Close, nil
	}
}

// lineLogger forwards a process's output, line by line, to the test's logger (ctx from
// logtest.WithT) and keeps the tail for error messages. The closer returns only after the copy
// is done, so no line is logged after the sub-test finished.
type lineLogger struct {
	mu     sync.Mutex
	log    *logrus.Entry
	prefix string
	buf    bytes.Buffer
	tail   []string
}

func (l *lineLogger) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.buf.Write(p)
	for {
		line, err := l.buf.ReadString('\n')
		if err != nil { // partial line: keep it for the next write
			l.buf.Reset()
			l.buf.WriteString(line)
			break
		}
		l.emit(strings.TrimRight(line, "\n"))
	}
	return len(p), nil
}

func (l *lineLogger) emit(line string) {
	l.log.Info(l.prefix + line)
	l.tail = append(l.tail, line)
	if len(l.tail) > 40 {
		l.tail = l.tail[len(l.tail)-40:]
	}
}

func (l *lineLogger) flush() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.buf.Len() > 0 {
		l.emit(l.buf.String())
		l.buf.Reset()
	}
	return strings.Join(l.tail, "\n")
}

func proxyFactory(argv []string, name string) testsuite.SnapshotterFunc {
	return func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		socket := filepath.Join(root, socketName)
		args := make([]string, len(argv))
		for i, a := range argv {
			args[i] = strings.NewReplacer("{root}", root, "{socket}", socket).Replace(a)
		}
		// The sub-test's own logger (logtest.WithT: every entry goes to t.Log, formatted by
		// logrus, so a line shows as msg="[prog] ..."); the Go caller of emit is noise.
		logger := log.G(ctx)
		logger.Logger.SetReportCaller(false)
		out := &lineLogger{log: logger, prefix: "[" + filepath.Base(args[0]) + "] "}
		// The output goes through our own pipe rather than exec's copying goroutine, so that
		// a grandchild holding it open cannot stall the wait for the process itself.
		pr, pw, err := os.Pipe()
		if err != nil {
			return nil, nil, err
		}
		cmd := exec.Command(args[0], args[1:]...)
		cmd.Stdout, cmd.Stderr = pw, pw
		// Own process group, so that stray grandchildren can be killed; SIGKILL if the suite
		// binary dies first (e.g. killed by the Python driver's timeout).
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
		err = cmd.Start()
		pw.Close()
		if err != nil {
			pr.Close()
			return nil, nil, fmt.Errorf("start %q: %w", args, err)
		}
		copied := make(chan struct{})
		go func() {
			_, _ = io.Copy(out, pr)
			close(copied)
		}()
		exited := make(chan struct{})
		var waitErr error
		go func() {
			waitErr = cmd.Wait()
			// No process of its group may outlive the snapshotter.
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			select {
			case <-copied:
			case <-time.After(5 * time.Second): // a grandchild that left the group
			}
			pr.Close()
			<-copied
			close(exited)
		}()
		stop := func() error {
			select {
			case <-exited:
			default:
				_ = cmd.Process.Signal(syscall.SIGTERM)
				select {
				case <-exited:
				case <-time.After(envSeconds("KIPU_SNAP_STOP_TIMEOUT", 10*time.Second)):
					_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
					<-exited
					return fmt.Errorf("%q did not exit within the stop timeout after SIGTERM; "+
						"killed. Output tail:\n%s", args, out.flush())
				}
			}
			if waitErr != nil {
				return fmt.Errorf("%q: %v. Output tail:\n%s", args, waitErr, out.flush())
			}
			out.flush()
			return nil
		}

		conn, err := waitForSocket(ctx, socket, exited,
			envSeconds("KIPU_SNAP_START_TIMEOUT", 20*time.Second))
		if err != nil {
			stopErr := stop()
			return nil, nil, fmt.Errorf("%q: %w (stop: %v)", args, err, stopErr)
		}
		sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), name)
		return sn, func() error {
			connErr := conn.Close()
			if err := stop(); err != nil {
				return err
			}
			return connErr
		}, nil
	}
}

// waitForSocket polls until socket accepts a gRPC connection, the process exits, or timeout.
func waitForSocket(ctx context.Context, socket string, exited <-chan struct{},
	timeout time.Duration) (*grpc.ClientConn, error) {
	deadline := time.Now().Add(timeout)
	var lastErr error = errors.New("socket not created")
	for {
		select {
		case <-exited:
			return nil, fmt.Errorf("exited before serving %s (last dial error: %v)", socket, lastErr)
		default:
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("%s did not accept a gRPC connection within %s: %v",
				socket, timeout, lastErr)
		}
		if _, err := os.Stat(socket); err == nil {
			conn, err := dial(ctx, socket, 500*time.Millisecond)
			if err == nil {
				return conn, nil
			}
			lastErr = err
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// withNamespace makes every call of the factory's snapshotter carry namespace ns instead of
// the suite's "testsuite".
func withNamespace(factory testsuite.SnapshotterFunc, ns string) testsuite.SnapshotterFunc {
	return func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		sn, closer, err := factory(namespaces.WithNamespace(ctx, ns), root)
		if err != nil {
			return nil, nil, err
		}
		return &nsSnapshotter{Snapshotter: sn, ns: ns}, closer, nil
	}
}

type nsSnapshotter struct {
	snapshots.Snapshotter
	ns string
}

func (s *nsSnapshotter) c(ctx context.Context) context.Context {
	return namespaces.WithNamespace(ctx, s.ns)
}

func (s *nsSnapshotter) Stat(ctx context.Context, key string) (snapshots.Info, error) {
	return s.Snapshotter.Stat(s.c(ctx), key)
}

func (s *nsSnapshotter) Update(ctx context.Context, info snapshots.Info,
	fieldpaths ...string) (snapshots.Info, error) {
	return s.Snapshotter.Update(s.c(ctx), info, fieldpaths...)
}

func (s *nsSnapshotter) Usage(ctx context.Context, key string) (snapshots.Usage, error) {
	return s.Snapshotter.Usage(s.c(ctx), key)
}

func (s *nsSnapshotter) Mounts(ctx context.Context, key string) ([]mount.Mount, error) {
	return s.Snapshotter.Mounts(s.c(ctx), key)
}

func (s *nsSnapshotter) Prepare(ctx context.Context, key, parent string,
	opts ...snapshots.Opt) ([]mount.Mount, error) {
	return s.Snapshotter.Prepare(s.c(ctx), key, parent, opts...)
}

func (s *nsSnapshotter) View(ctx context.Context, key, parent string,
	opts ...snapshots.Opt) ([]mount.Mount, error) {
	return s.Snapshotter.View(s.c(ctx), key, parent, opts...)
}

func (s *nsSnapshotter) Commit(ctx context.Context, name, key string, opts ...snapshots.Opt) error {
	return s.Snapshotter.Commit(s.c(ctx), name, key, opts...)
}

func (s *nsSnapshotter) Remove(ctx context.Context, key string) error {
	return s.Snapshotter.Remove(s.c(ctx), key)
}

func (s *nsSnapshotter) Walk(ctx context.Context, fn snapshots.WalkFunc, filters ...string) error {
	return s.Snapshotter.Walk(s.c(ctx), fn, filters...)
}
