// goecho: a ttrpc peer built from Debian's golang-github-containerd-ttrpc-dev (v1.1.1), used
// by kata-ipu's interop tests and benchmark as the independent reference implementation.
//
//	goecho server -socket PATH              serve test.echo.v1.Echo until killed
//	goecho client -socket PATH              run the client checks against a server, JSON lines
//	goecho bench  -socket PATH -n N -inflight K -size BYTES   unary RTT + throughput, JSON
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/containerd/ttrpc"
	"github.com/gogo/protobuf/types"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

const service = "test.echo.v1.Echo"

func serve(path string) {
	s, err := ttrpc.NewServer()
	if err != nil {
		panic(err)
	}
	s.Register(service, map[string]ttrpc.Method{
		"Echo": func(ctx context.Context, un func(interface{}) error) (interface{}, error) {
			var req types.StringValue
			if err := un(&req); err != nil {
				return nil, err
			}
			return &types.StringValue{Value: req.Value}, nil
		},
		// Fail: request "CODE:message" -> that status.
		"Fail": func(ctx context.Context, un func(interface{}) error) (interface{}, error) {
			var req types.StringValue
			if err := un(&req); err != nil {
				return nil, err
			}
			parts := strings.SplitN(req.Value, ":", 2)
			code, _ := strconv.Atoi(parts[0])
			return nil, status.Errorf(codes.Code(code), "%s", parts[1])
		},
		// Meta: the metadata and the deadline the server saw, as JSON.
		"Meta": func(ctx context.Context, un func(interface{}) error) (interface{}, error) {
			var req types.StringValue
			if err := un(&req); err != nil {
				return nil, err
			}
			md, _ := ttrpc.GetMetadata(ctx)
			out := map[string]interface{}{"md": md}
			if dl, ok := ctx.Deadline(); ok {
				out["deadline_ms"] = time.Until(dl).Milliseconds()
			}
			b, _ := json.Marshal(out)
			return &types.StringValue{Value: string(b)}, nil
		},
		// Sleep: request milliseconds; honours the context like a well-behaved handler.
		"Sleep": func(ctx context.Context, un func(interface{}) error) (interface{}, error) {
			var req types.Int64Value
			if err := un(&req); err != nil {
				return nil, err
			}
			select {
			case <-time.After(time.Duration(req.Value) * time.Millisecond):
				return &types.StringValue{Value: "slept"}, nil
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		},
		// Big: a response of N bytes (to exceed the 4 MiB frame limit on purpose).
		"Big": func(ctx context.Context, un func(interface{}) error) (interface{}, error) {
			var req types.Int64Value
			if err := un(&req); err != nil {
				return nil, err
			}
			return &types.BytesValue{Value: make([]byte, req.Value)}, nil
		},
		// Bytes: echo bytes (benchmark payload).
		"Bytes": func(ctx context.Context, un func(interface{}) error) (interface{}, error) {
			var req types.BytesValue
			if err := un(&req); err != nil {
				return nil, err
			}
			return &req, nil
		},
	})
	os.Remove(path)
	l, err := net.Listen("unix", path)
	if err != nil {
		panic(err)
	}
	fmt.Println("ready")
	if err := s.Serve(context.Background(), l); err != nil {
		fmt.Fprintln(os.Stderr, err)
	}
}

type result struct {
	Name  string `json:"name"`
	Code  int    `json:"code"`
	Msg   string `json:"msg,omitempty"`
	Value string `json:"value,omitempty"`
}

func emit(r result) {
	b, _ := json.Marshal(r)
	fmt.Println(string(b))
}

func record(name string, value string, err error) {
	r := result{Name: name, Value: value}
	if err == context.DeadlineExceeded {
		// the Go client gave up locally at its deadline: report it as the gRPC code
		err = status.Error(codes.DeadlineExceeded, err.Error())
	}
	if err != nil {
		st, _ := status.FromError(err)
		r.Code = int(st.Code())
		r.Msg = st.Message()
		if r.Msg == "" {
			r.Msg = err.Error()
		}
	}
	emit(r)
}

func dial(path string) *ttrpc.Client {
	conn, err := net.Dial("unix", path)
	if err != nil {
		panic(err)
	}
	return ttrpc.NewClient(conn)
}

func clientChecks(path string) {
	c := dial(path)
	ctx := context.Background()
	var resp types.StringValue

	err := c.Call(ctx, service, "Echo", &types.StringValue{Value: "hi"}, &resp)
	record("echo", resp.Value, err)

	resp = types.StringValue{}
	err = c.Call(ctx, service, "Fail", &types.StringValue{Value: "5:nope"}, &resp)
	record("fail", "", err)

	err = c.Call(ctx, service, "Nope", &types.StringValue{}, &resp)
	record("unknown_method", "", err)
	err = c.Call(ctx, "test.missing.v1.Svc", "Echo", &types.StringValue{}, &resp)
	record("unknown_service", "", err)

	mctx := ttrpc.WithMetadata(ctx, ttrpc.MD{"k": {"v1", "v2"}, "solo": {"x"}})
	mctx, cancel := context.WithTimeout(mctx, 5*time.Second)
	resp = types.StringValue{}
	err = c.Call(mctx, service, "Meta", &types.StringValue{}, &resp)
	cancel()
	record("metadata", resp.Value, err)

	dctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	err = c.Call(dctx, service, "Sleep", &types.Int64Value{Value: 5000}, &resp)
	cancel()
	record("deadline", "", err)

	var wg sync.WaitGroup
	var mu sync.Mutex
	good := 0
	for i := 0; i < 200; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			var r types.StringValue
			want := fmt.Sprintf("call-%d", i)
			if err := c.Call(ctx, service, "Echo", &types.StringValue{Value: want}, &r); err == nil && r.Value == want {
				mu.Lock()
				good++
				mu.Unlock()
			}
		}(i)
	}
	wg.Wait()
	emit(result{Name: "concurrent", Value: strconv.Itoa(good)})

	big := strings.Repeat("x", 5<<20)
	err = c.Call(ctx, service, "Echo", &types.StringValue{Value: big}, &resp)
	record("oversize", "", err)
	resp = types.StringValue{}
	err = c.Call(ctx, service, "Echo", &types.StringValue{Value: "after"}, &resp)
	record("after_oversize", resp.Value, err)

	// The Python side drops the connection while Hang is in flight.
	err = c.Call(ctx, service, "Hang", &types.StringValue{}, &resp)
	record("dropped", "", err)
}

func bench(path string, n, inflight, size int) {
	c := dial(path)
	ctx := context.Background()
	payload := &types.BytesValue{Value: make([]byte, size)}
	// sequential round trips
	rtts := make([]float64, 0, n)
	for i := 0; i < n; i++ {
		var r types.BytesValue
		t := time.Now()
		if err := c.Call(ctx, service, "Bytes", payload, &r); err != nil {
			panic(err)
		}
		rtts = append(rtts, float64(time.Since(t).Microseconds()))
	}
	sort.Float64s(rtts)
	// throughput with `inflight` calls outstanding
	total := n * 4
	jobs := make(chan struct{}, total)
	for i := 0; i < total; i++ {
		jobs <- struct{}{}
	}
	close(jobs)
	var wg sync.WaitGroup
	start := time.Now()
	for w := 0; w < inflight; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range jobs {
				var r types.BytesValue
				if err := c.Call(ctx, service, "Bytes", payload, &r); err != nil {
					panic(err)
				}
			}
		}()
	}
	wg.Wait()
	el := time.Since(start).Seconds()
	out, _ := json.Marshal(map[string]float64{
		"median_rtt_us": rtts[len(rtts)/2],
		"p99_rtt_us":    rtts[len(rtts)*99/100],
		"calls_per_s":   float64(total) / el,
	})
	fmt.Println(string(out))
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: goecho server|client|bench -socket PATH")
		os.Exit(2)
	}
	fs := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	path := fs.String("socket", "", "unix socket path")
	n := fs.Int("n", 5000, "calls")
	inflight := fs.Int("inflight", 64, "concurrent calls")
	size := fs.Int("size", 1024, "payload bytes")
	fs.Parse(os.Args[2:])
	switch os.Args[1] {
	case "server":
		serve(*path)
	case "client":
		clientChecks(*path)
	case "bench":
		bench(*path, *n, *inflight, *size)
	default:
		os.Exit(2)
	}
}
